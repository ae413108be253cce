"""The committed ``PERFORMANCE.md``: every listed run, side by side, generated from their ``outputs.json``.

    python -m loadtest.performance reports/<run> [reports/<run> ...] [--bench reports/bench/bench.json]
        [--profile before/profile.json --profile reports/profile/profile.json]

One run's ``PERFORMANCE.md`` says what that run measured; this page says what the machine does
*reliably*: every run given is listed with its commit, none is dropped, so a figure the next run did
not reproduce is visible as such. The cached (``demo``) and uncached (``cold``) runs stand next to
each other, the latest ``demo`` run's own report follows in full (its verdict and targets are what
``make frontpage`` copies to the README), ``make bench`` adds its ratios (each path against each of its references), and
``make profile`` runs add where the API's CPU per request goes, before and after a change.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.stackconfig import REPO_ROOT
from loadtest.report import fmt

COLUMNS = (
    ("p95_latency_ms", "p95"),
    ("plateau_qps", "plateau req/s"),
    ("plateau_p95_latency_ms", "plateau p95"),
    ("error_rate", "errors"),
    ("dropped_iterations", "dropped"),
    ("cache_hit_ratio", "hit ratio"),
    ("completion_p95_ms", "completion p95"),
    ("tasks_lost", "lost"),
)


def load_run(run_dir: Path) -> dict[str, Any]:
    out = json.loads((run_dir / "outputs.json").read_text())
    out["_dir"] = run_dir
    return out


def runs_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    head = "| run | commit | profile | verdict | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    for r in runs:
        cells = [fmt(key, r.get(key)) for key, _ in COLUMNS]
        verdict = "PASS" if r.get("thresholds_passed") else "FAIL"
        profile = f"{r.get('profile')} (baseline)" if r.get("_baseline") else r.get("profile")
        lines.append(
            f"| `{r.get('test_id')}` | `{r.get('git_commit') or 'unknown'}` | {profile} | {verdict} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def medians(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Median of each column over the latest three runs of each profile that has three (baselines aside)."""
    by_profile: dict[str, list[Mapping[str, Any]]] = {}
    for r in sorted((r for r in runs if not r.get("_baseline")), key=lambda r: str(r.get("started_at"))):
        by_profile.setdefault(str(r.get("profile")), []).append(r)
    lines = []
    for profile, all_runs in by_profile.items():
        if len(all_runs) < 3:
            continue
        group = all_runs[-3:]
        parts = []
        for key, label in COLUMNS:
            values = [float(r[key]) for r in group if isinstance(r.get(key), int | float)]
            if values:
                parts.append(f"{label} {fmt(key, statistics.median(values))}")
        passed = sum(1 for r in group if r.get("thresholds_passed"))
        lines.append(f"- `{profile}`, latest {len(group)} runs, {passed} passed — median: " + ", ".join(parts) + ".")
    return lines


def bench_references(section: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A bench.json path section's references, each with ``reference`` (what it does), ``max_rate`` and
    ``ratio_service_to_reference``: its ``references`` list, or for a bench.json written before there
    was one (one reference per path) the top-level keys as its only reference."""
    listed = section.get("references")
    if isinstance(listed, list) and listed:
        return [dict(r) for r in listed]
    return [
        {
            "reference": section.get("reference"),
            "max_rate": section.get("reference_max_rate"),
            "ratio_service_to_reference": section.get("ratio_service_to_reference"),
        }
    ]


def bench_rows(bench: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """One row per (path, reference): path, then service req/s, hit ratio at max, reference, its req/s, ratio."""
    rows = []
    for path in ("hot", "cold"):
        section = bench.get(path)
        if not section:
            continue
        hit = fmt("cache_hit_ratio", section.get("service_cache_hit_ratio_at_max"))
        for ref in bench_references(section):
            cells = [str(section.get("service_max_rate")), hit, str(ref.get("reference")), str(ref.get("max_rate"))]
            rows.append((path, [*cells, str(ref.get("ratio_service_to_reference"))]))
    return rows


def bench_lines(bench: Mapping[str, Any]) -> list[str]:
    warmup_s = bench["criteria"].get("warmup_s")
    warmup = f", each after a warm-up of {warmup_s} s that is not judged" if warmup_s else ""
    several = any(len(bench_references(bench[p])) > 1 for p in ("hot", "cold") if bench.get(p))
    against = "each of its bare references (one row each)" if several else "its own bare reference"
    lines = [
        f"`make bench` at commit `{bench.get('git_commit') or 'unknown'}`: highest constant arrival rate with p95 "
        f"{bench['criteria']['p95_latency_ms']} ms, errors {bench['criteria']['error_rate']}, no dropped "
        f"iterations ({bench['criteria']['step_s']} s steps{warmup}), each path against {against}.",
        "",
        "| path | service (req/s) | hit ratio at max | reference | reference (req/s) | service ÷ reference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {path} | " + " | ".join(cells) + " |" for path, cells in bench_rows(bench)]
    return lines


def profile_lines(profiles: Sequence[Mapping[str, Any]]) -> list[str]:
    """One table per path: CPU µs per request of the API process by library, one column per profile run."""
    lines: list[str] = [
        "CPU time of the API process per request (µs), by the library of the innermost frame, from `py-spy record` "
        "while k6 held a constant rate (`make profile`; requests counted by the API's own counter over the sampled "
        "seconds). Columns are runs in the order given, each with its commit; compare columns at the same rate.",
        "",
    ]
    paths = list(dict.fromkeys(p for prof in profiles for p in prof.get("paths", {})))
    for path in paths:
        cols = [(prof, prof["paths"][path]) for prof in profiles if path in prof.get("paths", {})]
        categories = list(dict.fromkeys(c for _, r in cols for c in r.get("by_category_us_per_request", {})))
        head = " | ".join(f"`{prof.get('git_commit') or 'unknown'}`" for prof, _ in cols)
        lines += [f"**{path}** path", "", f"| | {head} |", "|---|" + "---|" * len(cols)]
        rows: list[tuple[str, Any]] = [
            ("rate (req/s)", lambda r: r.get("rate")),
            ("requests sampled", lambda r: r.get("requests")),
            ("cache hit ratio", lambda r: fmt("cache_hit_ratio", r.get("cache_hit_ratio"))),
            ("k6 step", lambda r: "pass" if r.get("step_passed") else "FAIL"),
            ("**CPU µs per request**", lambda r: f"**{r.get('cpu_us_per_request')}**"),
            *((c, lambda r, c=c: r.get("by_category_us_per_request", {}).get(c, 0)) for c in categories),
        ]
        for label, value in rows:
            lines.append(f"| {label} | " + " | ".join(str(value(r)) for _, r in cols) + " |")
        lines.append("")
    return lines


def render(
    runs: Sequence[Mapping[str, Any]],
    benches: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    profiles: Sequence[Mapping[str, Any]] = (),
) -> str:
    current = [r for r in runs if not r.get("_baseline")] or list(runs)
    demos = [r for r in current if r.get("profile") == "demo"]
    latest = max(demos or current, key=lambda r: str(r.get("started_at")))
    own = (Path(latest["_dir"]) / "PERFORMANCE.md").read_text().splitlines()
    verdict_at = next(i for i, line in enumerate(own) if line.startswith("**Verdict:"))
    first_section = next((i for i, line in enumerate(own) if line.startswith("## ")), len(own))
    lines = [
        "# loadproof — measured performance",
        "",
        "Generated by `python -m loadtest.performance` from the runs' own `outputs.json`: nothing typed by hand. "
        "Every run listed was made on the machine described below, and none is left out.",
        "",
        f"Latest `{latest.get('profile')}` run:",
        "",
        *own[verdict_at:first_section],
        "## Every run",
        "",
        "Cached (`demo`: Zipf keys, the cache helps) and uncached (`cold`: every request a new task) side by side; "
        "each hit ratio is next to its latencies. The completion p95 of a `cold` run is the backlog the simulated "
        "LLM cannot finish at 1000 new tasks/s, not an accept-path figure.",
        "",
        *runs_table(runs),
        "",
        *medians(runs),
        *(f"- {note}" for note in notes),
        "",
    ]
    if benches:
        lines += ["## make bench", ""]
        for bench in benches:  # every bench run given, in order
            lines += [*bench_lines(bench), ""]
    if profiles:
        lines += ["## Profile of the API process", "", *profile_lines(profiles)]
    lines += [f"## Latest {latest.get('profile')} run in full", "", *own[first_section:]]
    text = "\n".join(lines)
    return text.replace("\n## Every number", "\n### Every number").rstrip() + "\n"


FULL_HEADING = re.compile(r"^## Latest \S+ run in full$", re.MULTILINE)
RUN_ID = re.compile(r"^(\d{4})(\d\d)(\d\d)-(\d\d)(\d\d)(\d\d)-")


def parse_cell(text: str) -> float | None:
    """A value as :func:`loadtest.report.fmt` wrote it back into a number ("12.3 ms", "0.40 %", "1000.0/s")."""
    if text == "n/a":
        return None
    if text.endswith(" %"):
        return float(text[:-2]) / 100
    return float(text.removesuffix(" ms").removesuffix("/s"))


def parse_row(line: str) -> dict[str, Any] | None:
    """A row of :func:`runs_table` as the run it lists (what :func:`medians` needs); None for other lines.
    A run's start is read from its id (UTC), so rows and loaded runs sort together."""
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 4 + len(COLUMNS) or not cells[0].startswith("`"):
        return None
    run_id = cells[0].strip("`")
    when = RUN_ID.match(run_id)
    y, mo, d, h, mi, sec = when.groups() if when else ("",) * 6
    profile, baseline, _ = cells[2].partition(" (baseline)")
    run: dict[str, Any] = {
        "test_id": run_id,
        "started_at": f"{y}-{mo}-{d}T{h}:{mi}:{sec}+00:00" if when else "",
        "profile": profile,
        "thresholds_passed": cells[3] == "PASS",
        "_baseline": bool(baseline),
    }
    for (key, _), text in zip(COLUMNS, cells[4:], strict=True):
        run[key] = parse_cell(text)
    return run


def sections(text: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """The lines before the first ``## `` heading, each ``## `` section's lines by heading, and the
    latest run's full report (its heading and everything after it: its own sections included)."""
    match = FULL_HEADING.search(text)
    full = text[match.start() :].splitlines() if match else []
    head: list[str] = []
    body: dict[str, list[str]] = {}
    current = head
    for line in (text[: match.start()] if match else text).splitlines():
        if line.startswith("## "):
            current = body.setdefault(line, [])
        else:
            current.append(line)
    return head, body, full


def extend(
    doc: str,
    runs: Sequence[Mapping[str, Any]],
    benches: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    profiles: Sequence[Mapping[str, Any]] = (),
) -> str:
    """An earlier PERFORMANCE.md with more runs, bench runs, profiles and notes added.

    Why: a run's directory is not committed (reports/ is a working area), so a checkout without the
    directories of earlier runs cannot regenerate the page from them. What the page lists is kept as
    it was generated (rows, medians, notes, bench and profile tables) and what is given is added after
    it. The medians are recomputed over the rows listed and the runs given (the rows read back, see
    :func:`parse_row`); the latest demo run (verdict and full report) is replaced only by a demo run given.
    """
    head, body, full = sections(doc)
    if any(not r.get("_baseline") and r.get("profile") == "demo" for r in runs):
        head, _, full = sections(render(runs))  # the new latest demo's verdict and full report
    every = body.get("## Every run", [])
    listed = [run for run in map(parse_row, every) if run is not None]
    is_median = re.compile(r"^- `[^`]+`, latest \d+ runs, ").match
    lines = [
        *head,
        "## Every run",
        "",
        *(line for line in every if line and not line.startswith(("|", "- "))),  # the section's own sentence
        "",
        *(line for line in every if line.startswith("|")),
        *runs_table(runs)[2:],
        "",
        *medians(sorted([*listed, *runs], key=lambda r: str(r.get("started_at")))),
        *(line for line in every if line.startswith("- ") and not is_median(line)),
        *(f"- {note}" for note in notes),
        "",
    ]
    if "## make bench" in body or benches:
        lines += ["## make bench", *body.get("## make bench", [])]
        for bench in benches:
            lines += [*bench_lines(bench), ""]
    if "## Profile of the API process" in body or profiles:
        lines += ["## Profile of the API process", *body.get("## Profile of the API process", [])]
        lines += profile_lines(profiles) if profiles else []
    text = "\n".join([*lines, *full])
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (reports/<run-id>)")
    parser.add_argument(
        "--extend",
        type=Path,
        default=None,
        help="an earlier PERFORMANCE.md to keep and add to (the directories of its runs need not exist)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="a run of older code made for a comparison: in the table, never the latest run or in a median",
    )
    parser.add_argument("--bench", type=Path, action="append", default=[], help="a bench.json (repeatable)")
    parser.add_argument("--profile", type=Path, action="append", default=[], help="a profile.json (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "PERFORMANCE.md")
    parser.add_argument("--note", action="append", default=[], help="a sentence about the runs (repeatable)")
    args = parser.parse_args(argv)
    baselines = [{**load_run(d), "_baseline": True} for d in args.baseline]
    runs = sorted([*(load_run(d) for d in args.runs), *baselines], key=lambda r: str(r.get("started_at")))
    benches = [json.loads(path.read_text()) for path in args.bench]
    profiles = [json.loads(path.read_text()) for path in args.profile]
    if args.extend is not None:
        args.out.write_text(extend(args.extend.read_text(), runs, benches, args.note, profiles))
    elif not runs:
        parser.error("give run directories, or --extend an earlier PERFORMANCE.md")
    else:
        args.out.write_text(render(runs, benches, args.note, profiles))
    print(f"wrote {args.out} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
