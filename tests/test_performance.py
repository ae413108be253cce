"""The committed PERFORMANCE.md lists every run given, with its commit, and the README copies from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest import frontpage, performance, report
from tests.test_report import OUT


def make_run(root: Path, test_id: str, profile: str, started: str, **values: Any) -> Path:
    out = {**OUT, "test_id": test_id, "profile": profile, "started_at": started, "git_commit": "abc123", **values}
    run = root / test_id
    run.mkdir()
    (run / "outputs.json").write_text(json.dumps(out))
    md = report.render_markdown(out, commands=["make demo"], workload={"zipfS": 1.1}, profile={"stages": []})
    (run / "PERFORMANCE.md").write_text(md)
    return run


def test_every_run_is_listed_and_the_latest_demo_leads(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path, "r1-demo", "demo", "2026-01-01T00:00:00", p95_latency_ms=50.0),
        make_run(tmp_path, "r2-demo", "demo", "2026-01-01T00:10:00", p95_latency_ms=90.0, thresholds_passed=False),
        make_run(tmp_path, "r3-demo", "demo", "2026-01-01T00:20:00", p95_latency_ms=70.0),
        make_run(tmp_path, "r4-cold", "cold", "2026-01-01T00:30:00", cache_hit_ratio=0.0),
    ]
    bench = {
        "git_commit": "abc123",
        "criteria": {"p95_latency_ms": "< 400", "error_rate": "< 0.01", "step_s": 12},
        "hot": {"service_max_rate": 2000, "reference_max_rate": 2400, "ratio_service_to_reference": 0.833,
                "service_cache_hit_ratio_at_max": 0.9, "reference": "one Redis GET per request"},
    }  # fmt: skip
    loaded = sorted((performance.load_run(r) for r in runs), key=lambda r: r["started_at"])
    text = performance.render(loaded, [bench])
    for run_id in ("r1-demo", "r2-demo", "r3-demo", "r4-cold"):
        assert f"`{run_id}` | `abc123`" in text  # every run, the failing one included
    assert "| `r2-demo` | `abc123` | demo | FAIL |" in text
    assert "`demo`, latest 3 runs, 2 passed — median: p95 70.0 ms" in text  # the median, not the best
    assert frontpage.run_id(text) == "r3-demo"  # the latest demo run's verdict leads
    assert "| hot | 2000 | 90.00 % | one Redis GET per request | 2400 | 0.833 |" in text
    block = frontpage.results_block(text)
    assert "**Every run**" in block and "**make bench**" in block and "`r4-cold`" in block


def test_a_baseline_run_is_listed_but_never_the_latest_or_in_a_median(tmp_path: Path) -> None:
    """A run of older code made later for a comparison must not become the file's verdict."""
    runs = [
        make_run(tmp_path, f"r{i}-demo", "demo", f"2026-01-01T00:0{i}:00", p95_latency_ms=10.0 * i) for i in (1, 2, 3)
    ]
    old = make_run(tmp_path, "r9-demo", "demo", "2026-01-01T00:09:00", p95_latency_ms=999.0, thresholds_passed=False)
    assert performance.main([*map(str, runs), "--baseline", str(old), "--out", str(tmp_path / "P.md")]) == 0
    text = (tmp_path / "P.md").read_text()
    assert "| `r9-demo` | `abc123` | demo (baseline) | FAIL |" in text
    assert frontpage.run_id(text) == "r3-demo"
    assert "`demo`, latest 3 runs, 3 passed — median: p95 20.0 ms" in text


def test_extending_keeps_what_the_page_listed_when_its_run_directories_are_gone(tmp_path: Path) -> None:
    """reports/ is not committed: a fresh checkout adds its runs to the page instead of regenerating it."""

    def run(root: Path, minute: int, profile: str, p95: float) -> Path:
        return make_run(root, f"20260101-00{minute:02}00-{profile}", profile, f"2026-01-01T00:{minute:02}:00+00:00",
                        p95_latency_ms=p95)  # fmt: skip

    first = [run(tmp_path, i, "demo", 10.0 * i) for i in (1, 2, 3)] + [run(tmp_path, 4, "cold", 100.0)]
    first.append(run(tmp_path, 5, "cold", 300.0))
    bench = {"git_commit": "b1", "criteria": {"p95_latency_ms": "< 400", "error_rate": "< 0.01", "step_s": 12},
             "cold": {"service_max_rate": 900, "reference_max_rate": 700, "ratio_service_to_reference": 1.286,
                      "service_cache_hit_ratio_at_max": 0.0, "reference": "INSERT + XADD"}}  # fmt: skip
    (tmp_path / "b1.json").write_text(json.dumps(bench))
    page = tmp_path / "P.md"
    assert performance.main([*map(str, first), "--bench", str(tmp_path / "b1.json"), "--out", str(page)]) == 0
    old = page.read_text()
    assert "`cold`, latest" not in old  # two cold runs: no median yet
    assert performance.extend(old, []) == old  # nothing given: the page as it was, byte for byte

    (tmp_path / "b2.json").write_text(json.dumps({**bench, "git_commit": "b2"}))
    later = tmp_path / "later"
    later.mkdir()
    cold = run(later, 6, "cold", 200.0)
    args = [str(cold), "--extend", str(page), "--bench", str(tmp_path / "b2.json"), "--note", "n2", "--out", str(page)]
    assert performance.main(args) == 0
    text = page.read_text()
    for minute, profile in ((1, "demo"), (2, "demo"), (3, "demo"), (4, "cold"), (5, "cold"), (6, "cold")):
        assert f"`20260101-00{minute:02}00-{profile}` | `abc123`" in text
    assert frontpage.run_id(text) == "20260101-000300-demo"  # a cold run does not replace the latest demo
    assert "`demo`, latest 3 runs, 3 passed — median: p95 20.0 ms" in text
    assert "`cold`, latest 3 runs, 3 passed — median: p95 200.0 ms" in text  # listed rows and the run given
    assert text.count("| cold | 900 | 0.00 % | INSERT + XADD | 700 | 1.286 |") == 2
    assert text.index("- n2") < text.index("## make bench")

    newer = [run(later, i, "demo", 100.0 * i) for i in (7, 8, 9)]
    performance.main([*map(str, newer), "--extend", str(page), "--out", str(page)])
    text = page.read_text()
    assert frontpage.run_id(text) == "20260101-000900-demo" and "`20260101-000100-demo`" in text and "- n2" in text
    assert "`demo`, latest 3 runs, 3 passed — median: p95 800.0 ms" in text and "median: p95 20.0 ms" not in text
    assert text.count("## make bench") == 1 and text.count("| cold | 900 |") == 2


def test_a_bench_with_two_references_per_path_shows_four_ratios_and_an_old_one_still_renders(tmp_path: Path) -> None:
    """bench.json lists every reference of a path; one written before that (one reference per path, at
    the section's top level) renders as it did."""
    criteria = {"p95_latency_ms": "< 400", "error_rate": "< 0.01", "step_s": 12, "warmup_s": 8}

    def ref(mode: str, what: str, rate: int, ratio: float) -> dict[str, Any]:
        return {"mode": mode, "reference": what, "max_rate": rate, "ratio_service_to_reference": ratio, "steps": []}

    hot_refs = [ref("get", "one Redis GET", 3600, 1.333), ref("constant", "a constant body", 9600, 0.5)]
    cold_refs = [ref("insert", "INSERT + XADD", 1800, 1.056), ref("group", "group commit", 2400, 0.792)]
    new = {
        "git_commit": "new1",
        "criteria": criteria,
        "hot": {"service_max_rate": 4800, "service_cache_hit_ratio_at_max": 0.9, "reference": "one Redis GET",
                "reference_max_rate": 3600, "ratio_service_to_reference": 1.333, "references": hot_refs},
        "cold": {"service_max_rate": 1900, "service_cache_hit_ratio_at_max": 0.0, "reference": "INSERT + XADD",
                 "reference_max_rate": 1800, "ratio_service_to_reference": 1.056, "references": cold_refs},
    }  # fmt: skip
    lines = performance.bench_lines(new)
    assert lines[-4:] == [
        "| hot | 4800 | 90.00 % | one Redis GET | 3600 | 1.333 |",
        "| hot | 4800 | 90.00 % | a constant body | 9600 | 0.5 |",
        "| cold | 1900 | 0.00 % | INSERT + XADD | 1800 | 1.056 |",
        "| cold | 1900 | 0.00 % | group commit | 2400 | 0.792 |",
    ]
    assert "each of its bare references (one row each)" in lines[0]
    old = {
        "git_commit": "old1",
        "criteria": criteria,
        "cold": {"service_max_rate": 900, "reference_max_rate": 700, "ratio_service_to_reference": 1.286,
                 "service_cache_hit_ratio_at_max": 0.0, "reference": "INSERT + XADD"},
    }  # fmt: skip
    lines = performance.bench_lines(old)
    assert lines[-2:] == ["|---|---|---|---|---|---|", "| cold | 900 | 0.00 % | INSERT + XADD | 700 | 1.286 |"]
    assert "each path against its own bare reference." in lines[0]
    assert [cells[-1] for _, cells in performance.bench_rows(new)] == ["1.333", "0.5", "1.056", "0.792"]

    # the page: an earlier one with the old table, extended by the new bench; the front page shows the latest
    runs = [make_run(tmp_path, "r1-demo", "demo", "2026-01-01T00:00:00")]
    page = performance.extend(performance.render([performance.load_run(r) for r in runs], [old]), [], [new])
    block = frontpage.results_block(page)
    assert page.count("| cold | 900 | 0.00 % | INSERT + XADD | 700 | 1.286 |") == 1
    rows = lines_of(new)
    assert len(rows) == 4 and all(page.count(row) == 1 and row in block for row in rows)


def lines_of(bench: dict[str, Any]) -> list[str]:
    return [line for line in performance.bench_lines(bench) if line.startswith(("| hot ", "| cold "))]
