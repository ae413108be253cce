"""The docs stay true: README.md is a short front page whose numbers are copied, never typed; the generated
tables in docs/ match the code; every relative link resolves; the architecture page names every package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from common.stackdoc import key_rows, stack_keys_table
from loadtest import compare, frontpage, report
from service.config import Settings
from service.settings_doc import settings_table
from tests.test_layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PERFORMANCE = (ROOT / frontpage.PERFORMANCE).read_text()
CAPTURE = (ROOT / frontpage.DEMO_OUTPUT).read_text()


def _doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


# ---------------------------------------------------------------- the front page


def test_readme_is_a_front_page() -> None:
    assert README.startswith("# loadproof\n")
    assert len(README.splitlines()) <= 200, "README.md is the front page: move reference material to docs/"


def test_the_two_setup_commands_come_before_any_cluster_text() -> None:
    commands = re.search(r"```bash\nmake demo\b[^\n]*\nmake test\b[^\n]*\n```", README)
    assert commands, "README needs the two set-up commands, `make demo` then `make test`, in one bash block"
    before = README[: commands.start()]
    assert not re.search(r"pulumi|kubernetes|kubectl|cluster", before, re.I), "the local commands come first"
    assert "pulumi up" in README[commands.end() :]


def test_readme_blocks_are_what_the_committed_run_produces() -> None:
    assert frontpage.render(README, PERFORMANCE, CAPTURE) == README, "run `make frontpage`"


def test_a_committed_placeholder_holds_no_numbers() -> None:
    if frontpage.run_id(PERFORMANCE) is None:
        assert not re.search(r"\d", PERFORMANCE), "PERFORMANCE.md without a run must not show any figure"


# ------------------------------------------------- the generator, on a run shaped like a real one

RUN = "demo-test-run"


def _outputs() -> dict[str, Any]:
    """Synthetic outputs: only the shape matters here, so values are placeholders."""
    return {
        "test_id": RUN,
        "profile": "smoke",
        "started_at": "start",
        "thresholds_passed": False,
        "threshold_results": {"p95_latency_ms": False, "tasks_lost": True},
        "thresholds": {"p95_latency_ms": 400.0},
        "p95_latency_ms": 1.0,
        "tasks_lost": 0,
        "llm_calls": 7,
        "machine": {"cores": 2, "cpu_model": "test-cpu"},
        "errors_by_status": {"0": 1},
        "notes": ["supervised restarts during the run: worker-0 x1"],
    }


def _performance(with_compare: bool) -> str:
    out = _outputs()
    text = report.render_markdown(out, commands=["make demo PROFILE=smoke"], workload={}, profile={})
    if with_compare:
        result = compare.comparison(out, out, profile="smoke")
        text += "\n" + compare.render_markdown(result, ["make compare PROFILE=smoke"])
    return text


def test_results_block_copies_the_verdict_targets_notes_and_machine_verbatim() -> None:
    perf = _performance(with_compare=True)
    block = frontpage.results_block(perf)
    top = perf.split("## Every number")[0]
    for line in top.splitlines():
        if line.startswith(("**Verdict:", "| ", "Failed requests", "Note:")):
            assert line in block.splitlines(), line
    assert next(line for line in perf.splitlines() if line.startswith("- Machine:")) in block
    assert "| Number | Baseline | Optimized | Optimized ÷ baseline |" in block
    assert "(`llm_calls`)" not in block, "the long table stays in PERFORMANCE.md"
    assert "```" not in block and "make compare PROFILE" not in block


def test_the_front_page_shows_the_latest_bench_only() -> None:
    """Every bench stays in PERFORMANCE.md; the front page would otherwise grow by a table per bench."""
    bench = "## make bench\n\n" + "".join(
        f"`make bench` at commit `{c}`: steps.\n\n| path | ratio |\n|---|---|\n| hot | {r} |\n\n"
        for c, r in (("aaa", "0.5"), ("bbb", "0.7"), ("ccc", "0.9"))
    )
    block = frontpage.results_block(PERFORMANCE.replace("## make bench", bench + "## make bench (old)", 1))
    shown = block.split("**make bench**")[1]
    assert "`ccc`" in shown and "| hot | 0.9 |" in shown
    assert "`aaa`" not in shown and "| hot | 0.5 |" not in shown and "2 earlier `make bench` runs" in shown


def test_demo_output_block_is_the_capture_of_the_same_run() -> None:
    capture = f"# comment\n\x1b[1mloadproof demo\x1b[0m — run {RUN}\nresults\n"
    block = frontpage.demo_output_block(capture, RUN)
    assert f"loadproof demo — run {RUN}" in block and "\x1b" not in block and "# comment" not in block
    with pytest.raises(ValueError, match="one run"):
        frontpage.demo_output_block("output of another run\n", RUN)


def test_a_long_capture_shows_head_and_tail_and_the_page_stays_short() -> None:
    lines = [f"{RUN} line {i}" for i in range(300)]
    block = frontpage.demo_output_block("\n".join(lines), RUN)
    body = block.split("```text\n")[1].split("```")[0].splitlines()
    assert len(body) == frontpage.MAX_OUTPUT_LINES
    assert body[0] == lines[0] and body[-1] == lines[-1] and "omitted" in body[frontpage.HEAD_LINES]
    page = frontpage.render(README, _performance(with_compare=True), "\n".join(lines))
    assert len(page.splitlines()) <= 200, "a real run would push README.md over 200 lines"
    assert frontpage.render(page, _performance(with_compare=True), "\n".join(lines)) == page


def test_a_long_capture_gives_up_the_start_up_lines_before_any_result() -> None:
    start = [f"  ✓ service-{i} ready" for i in range(20)]
    table = [f"                loadproof results — {RUN} (demo)", *(f"| row {i} |" for i in range(25)), "report: x"]
    lines = [".venv/bin/python -m loadtest.demo --stack dev", f"loadproof demo — run {RUN}", *start, *table]
    body = frontpage.demo_output_block("\n".join(lines), RUN).split("```text\n")[1].split("```")[0].splitlines()
    assert body == [*lines[:2], "[... 20 lines omitted: the stack starting ...]", *table]


def test_without_a_run_the_blocks_say_so_and_show_no_figure() -> None:
    results = frontpage.results_block("# loadproof — measured performance\n\nNo measured run is committed yet.\n")
    output = frontpage.demo_output_block("# nothing captured yet\n", None)
    for text in (results, output):
        assert "committed yet" in text and not re.search(r"\d", text)


def test_missing_markers_are_an_error() -> None:
    with pytest.raises(ValueError, match="results"):
        frontpage.replace_block("# no blocks\n", "results", "x")


# ---------------------------------------------------------------- generated tables


def test_settings_table_is_current() -> None:
    text = _doc("settings.md")
    assert frontpage.block(text, "settings") == settings_table(), "regenerate with `python -m service.settings_doc`"
    for name in Settings.model_fields:
        assert f"`LOADPROOF_{name.upper()}`" in text


def test_stack_keys_table_is_current_and_complete() -> None:
    text = _doc("stack-keys.md")
    assert frontpage.block(text, "stack-keys") == stack_keys_table(), "regenerate with `python -m common.stackdoc`"
    for key, _default, description in key_rows():
        assert f"`{key}`" in text
        assert description, f"{key} has no description"


# ---------------------------------------------------------------- links and the architecture page

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """Markdown without fenced blocks and inline code, where a bracket is not a link."""
    return re.sub(r"`[^`\n]*`", "", _FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", text).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return out


def test_anchor_ids_follow_github() -> None:
    assert anchors("## `make bench` — the highest rate\n## A: b (c)\n## A: b (c)\n") == {
        "make-bench--the-highest-rate",
        "a-b-c",
        "a-b-c-1",
    }


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "PERFORMANCE.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target}: no such heading")
    assert broken == [], f"{path.name}: {broken}"


def test_the_docs_named_by_the_readme_exist_and_are_linked() -> None:
    linked = {t.partition("#")[0] for t in _LINK.findall(_prose(README))}
    for doc in DOCS:
        assert f"docs/{doc.name}" in linked, f"README.md does not link {doc.name}"


def test_architecture_has_a_mermaid_flowchart_and_every_package() -> None:
    text = _doc("architecture.md")
    diagrams = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    assert diagrams and all(d.startswith("flowchart ") for d in diagrams)
    for pkg in LAYERS:
        assert f"`{pkg}/`" in text, f"docs/architecture.md does not place {pkg}"


def test_front_page_lists_every_run_at_the_latest_commit_and_points_to_the_rest() -> None:
    lines = [
        "",
        "| run | commit | verdict |",
        "|---|---|---|",
        "| `r1` | `aaa` | PASS |",
        "| `r2` | `bbb` | FAIL |",
        "| `r3` | `bbb+dirty` | PASS |",
        "| `r4` | `bbb` | PASS |",
        "",
        "- `demo`, latest 3 runs, 2 passed — median: p95 1 ms.",
        "- a note on r1",
    ]
    out = frontpage._runs_at(lines, "bbb")
    assert [line for line in out if line.startswith("| `")] == ["| `r2` | `bbb` | FAIL |", "| `r4` | `bbb` | PASS |"]
    assert any("median" in line for line in out) and not any("a note on r1" in line for line in out)
    assert "2 other runs, and the notes on every run, are in [PERFORMANCE.md](PERFORMANCE.md)." in out
