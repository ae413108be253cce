"""README.md's measured blocks, generated from committed files: ``python -m loadtest.frontpage`` (``make frontpage``).

The front page must never show a typed or remembered figure, so its two blocks are copies:

* ``results`` from the root ``PERFORMANCE.md`` (:mod:`loadtest.performance`, or one run's
  ``reports/<run-id>/PERFORMANCE.md``): the latest run's verdict, targets table, failure and honesty
  notes and machine line, the table of every run, the bench ratios and the comparison table, verbatim.
  The long "Every number" table stays in PERFORMANCE.md, linked.
* ``demo-output`` from ``docs/demo-output.txt``, the captured output of that run.

Until a run is committed both files say so and the blocks say there are no numbers yet.
``--check`` exits 1 instead of writing when README.md is not what these files produce.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from common.stackconfig import REPO_ROOT

README = "README.md"
PERFORMANCE = "PERFORMANCE.md"
DEMO_OUTPUT = "docs/demo-output.txt"
# The front page stays within 200 lines. A longer capture gives up the stack's start-up lines first
# (the command and the run's title stay), so the results table is shown whole; one without a results
# table (or still too long) is shown as its head and tail.
MAX_OUTPUT_LINES = 36
HEAD_LINES = 8
TITLE_LINES = 2
RESULTS_TITLE = "loadproof results"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RUN_ID = re.compile(r"\(run `([^`]+)`")


def _block_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:begin[^>]*-->\n)(.*?\n)?(<!-- {name}:end -->)", re.S)


def block(text: str, name: str) -> str | None:
    """The body between ``<!-- name:begin ... -->`` and ``<!-- name:end -->``, without its last newline."""
    match = _block_re(name).search(text)
    if match is None:
        return None
    return (match.group(2) or "").removesuffix("\n")


def replace_block(text: str, name: str, body: str) -> str:
    if block(text, name) is None:
        raise ValueError(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    return _block_re(name).sub(lambda m: f"{m.group(1)}{body}\n{m.group(3)}", text, count=1)


_COMMIT = re.compile(r"commit `([0-9a-f]+(?:\+dirty)?)`")


def run_id(performance: str) -> str | None:
    """The run id on PERFORMANCE.md's verdict line, or None when no measured run is committed."""
    for line in performance.splitlines():
        if line.startswith("**Verdict:"):
            match = _RUN_ID.search(line)
            return match.group(1) if match else None
    return None


def _sections(performance: str) -> dict[str, list[str]]:
    """``## heading`` -> its lines; the text before the first heading is under ``""``."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in performance.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif not line.startswith("# "):
            sections[current].append(line)
    return sections


def _table_and_prose(lines: list[str]) -> list[str]:
    """Paragraphs and tables of a section, without fenced code (the reproduce commands)."""
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and not line.startswith("Runs: "):
            out.append(line)
    return out


def _latest_bench(lines: list[str]) -> list[str]:
    """The section's last ``make bench`` run (its sentence and table); the earlier ones stay in
    PERFORMANCE.md, so the front page does not grow with every bench."""
    starts = [i for i, line in enumerate(lines) if line.startswith("`make bench` at commit")]
    if len(starts) < 2:
        return _table_and_prose(lines)
    earlier = f"{len(starts) - 1} earlier `make bench` runs are in [PERFORMANCE.md](PERFORMANCE.md)."
    return [*_table_and_prose(lines[: starts[0]]), *_table_and_prose(lines[starts[-1] :]), "", earlier]


def _runs_at(lines: list[str], commit: str) -> list[str]:
    """The run table's rows at ``commit`` (every one of them, failures included) and the medians; the
    other rows and the notes on them stay in PERFORMANCE.md, which the front page links."""
    table = [line for line in lines if line.startswith("|")]
    rows = [line for line in table[2:] if f"`{commit}`" in line]
    medians = [line for line in lines if line.startswith("- `") and "latest" in line and "median" in line]
    earlier = len(table[2:]) - len(rows)
    tail = [f"{earlier} other runs, and the notes on every run, are in [PERFORMANCE.md](PERFORMANCE.md)."]
    return ["", *table[:2], *rows, "", *medians, "", *(tail if earlier else [])]


def _tidy(lines: list[str]) -> str:
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def results_block(performance: str) -> str:
    if run_id(performance) is None:
        return (
            "No measured run is committed yet, so there are no numbers here. [PERFORMANCE.md](PERFORMANCE.md) "
            "will hold the latest run's; until then `make demo` measures on your machine."
        )
    sections = _sections(performance)
    top = sections[""]
    start = next(i for i, line in enumerate(top) if line.startswith("**Verdict:"))
    parts = top[start:]  # verdict, targets table, failed-by-status and notes
    machine = [line for line in sections.get("How it was measured", []) if line.startswith("- Machine:")]
    if machine:
        parts += ["", *machine]
    commit = _COMMIT.search(top[start])
    for heading, lines in sections.items():
        if heading.startswith("Every run") and commit:
            parts += ["", f"**{heading}** (at the latest run's commit)", *_runs_at(lines, commit.group(1))]
        elif heading.startswith("make bench"):
            parts += ["", f"**{heading}**", *_latest_bench(lines)]
        elif heading.startswith(("Baseline vs optimized", "Every run")):
            parts += ["", f"**{heading}**", *_table_and_prose(lines)]
    parts += [
        "",
        "Copied from [PERFORMANCE.md](PERFORMANCE.md) by `make frontpage`; every number, the workload and the "
        "commands to reproduce are there. How to read each number: "
        "[docs/measurement.md](docs/measurement.md#every-number-and-how-to-read-it-honestly).",
    ]
    return _tidy(parts)


def capture_lines(capture: str) -> list[str]:
    """The captured output without colour codes, trailing blanks and the leading ``#`` comment lines."""
    lines = [_ANSI.sub("", line).rstrip() for line in capture.splitlines()]
    while lines and (not lines[0] or lines[0].startswith("#")):
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _fit(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_OUTPUT_LINES:
        return lines
    table = next((i for i, line in enumerate(lines) if RESULTS_TITLE in line), None)
    if table is not None and table > TITLE_LINES and len(lines) - table + TITLE_LINES + 1 <= MAX_OUTPUT_LINES:
        return [
            *lines[:TITLE_LINES],
            f"[... {table - TITLE_LINES} lines omitted: the stack starting ...]",
            *lines[table:],
        ]
    tail = MAX_OUTPUT_LINES - HEAD_LINES - 1
    omitted = len(lines) - HEAD_LINES - tail
    return [*lines[:HEAD_LINES], f"[... {omitted} lines omitted ...]", *lines[-tail:]]


def demo_output_block(capture: str, run: str | None) -> str:
    lines = capture_lines(capture)
    if not lines:
        return (
            "No captured run is committed yet: [docs/demo-output.txt](docs/demo-output.txt) will hold the output of "
            "a real `make demo`."
        )
    if run is not None and not any(run in line for line in lines):
        raise ValueError(f"{DEMO_OUTPUT} does not mention run {run} of {PERFORMANCE}: capture both from one run")
    shown = _fit(lines)
    source = f"run `{run}`" if run else "a real run"
    return "\n".join(
        [
            "```text",
            *shown,
            "```",
            "",
            f"Captured from {source}: [docs/demo-output.txt](docs/demo-output.txt).",
        ]
    )


def render(readme: str, performance: str, capture: str) -> str:
    """README.md with both blocks regenerated from the committed PERFORMANCE.md and demo capture."""
    run = run_id(performance)
    text = replace_block(readme, "demo-output", demo_output_block(capture, run))
    return replace_block(text, "results", results_block(performance))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = parser.parse_args(argv)
    readme_path = args.root / README
    readme = readme_path.read_text()
    try:
        new = render(readme, (args.root / PERFORMANCE).read_text(), (args.root / DEMO_OUTPUT).read_text())
    except (ValueError, FileNotFoundError) as exc:
        print(f"frontpage: {exc}", file=sys.stderr)
        return 2
    if new == readme:
        print(f"{README} is up to date")
        return 0
    if args.check:
        print(f"{README} differs from {PERFORMANCE} / {DEMO_OUTPUT}: run `make frontpage`", file=sys.stderr)
        return 1
    readme_path.write_text(new)
    print(f"rewrote the results and demo-output blocks of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
