"""Report rendering: self-contained HTML (no external resources), honest n/a, pass/fail, hit ratio next to latency."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from loadtest import report

OUT: dict[str, Any] = {
    "test_id": "20260101-000000-smoke",
    "profile": "smoke",
    "started_at": "2026-01-01T00:00:00+00:00",
    "duration_s": 30.0,
    "warmup_s": 5,
    "measured_window_s": 25.0,
    "drain_s": 12.0,
    "p50_latency_ms": 3.21,
    "p95_latency_ms": 123.45,
    "p99_latency_ms": 250.0,
    "server_p95_latency_ms": 100.0,
    "requests": 1201,
    "requests_including_warmup": 1300,
    "achieved_qps": 48.04,
    "peak_achieved_qps": 50.2,
    "target_qps": 50,
    "error_rate": 0.0025,
    "dropped_iterations": 0,
    "plateau_s": 20.0,
    "plateau_qps": 49.9,
    "plateau_p95_latency_ms": 130.5,
    "plateau_error_rate": 0.002,
    "cache_hit_ratio": 0.4321,
    "llm_calls": 109,
    "llm_tokens": 68556,
    "llm_cost_usd": 0.0287,
    "llm_cost_per_1k_tokens_usd": 0.000501,
    "billed_cost_per_1k_tokens_usd": 0.000419,
    "cost_per_request_usd": 2.3e-05,
    "completion_p95_ms": 5000.0,
    "tasks_accepted": 889,
    "tasks_completed": 886,
    "tasks_failed": 0,
    "tasks_lost": 0,
    "tasks_pending_after_drain": 3,
    "thresholds": {
        "p95_latency_ms": 400.0,
        "error_rate": 0.01,
        "dropped_iterations": 0,
        "llm_cost_per_1k_tokens_usd": 0.008,
        "tasks_lost": 0,
    },
    "threshold_results": {
        "p95_latency_ms": True,
        "error_rate": True,
        "dropped_iterations": True,
        "llm_cost_per_1k_tokens_usd": True,
        "tasks_lost": True,
    },
    "thresholds_passed": True,
    "k6_cross_check": {
        "available": True,
        "k6_p95_ms": 122.0,
        "prometheus_p95_ms": 123.45,
        "p95_relative_difference": 0.0119,
        "k6_requests": 1201,
        "prometheus_requests": 1201,
    },
    "machine": {"cores": 2, "cpu_model": "Test CPU <b>9000</b>", "memory_gib": 24.0, "os": "Linux"},
    "grafana_url": None,
}
SERIES: dict[str, Any] = {
    "end_s": 30.0,
    "warmup_s": 5,
    "p95_latency_ms": [(float(t), 100.0 + t) for t in range(31)],
    "p50_latency_ms": [(float(t), 3.0) for t in range(31)],
    "achieved_qps": [(float(t), min(50.0, 10 + 2 * t)) for t in range(31)],
    "target_qps": [(float(t), min(50.0, 10 + 4 * t)) for t in range(31)],
    "error_rate": [],
    "cache_hit_ratio": [(float(t), t / 60) for t in range(31)],
    "llm_spend_usd_cumulative": [(float(t), t / 1000) for t in range(41)],
}
COMMANDS = ["make demo STACK=dev PROFILE=smoke"]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.external: list[str] = []
        self.ids: set[str] = set()
        self.svgs = 0
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svgs += 1
        if tag in ("script", "link", "img", "iframe"):
            self.scripts += tag == "script"
            for key in ("src", "href"):
                if a.get(key):
                    self.external.append(a[key] or "")
        if a.get("id"):
            self.ids.add(a["id"] or "")


def _parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    c.close()
    return c


def test_html_is_self_contained_and_complete() -> None:
    text = report.render_html(OUT, SERIES, commands=COMMANDS)
    parsed = _parse(text)
    assert parsed.external == [] and parsed.scripts == 0  # no CDN, no scripts, works offline
    assert not re.search(r"(src|href)=['\"]https?://", text)
    assert {"verdict", "targets", "numbers"} <= parsed.ids
    assert parsed.svgs >= 5
    assert "ALL TARGETS MET" in text
    for key in ("p95_latency_ms", "error_rate", "cache_hit_ratio", "llm_cost_per_1k_tokens_usd", "achieved_qps"):
        assert report.fmt(key, OUT[key]) in text
    assert "make demo STACK=dev PROFILE=smoke" in text
    assert "Test CPU &lt;b&gt;9000&lt;/b&gt;" in text  # escaped, never injected
    assert "No Grafana ran" in text


def test_hit_ratio_printed_next_to_every_latency() -> None:
    text = report.render_html(OUT, SERIES, commands=COMMANDS)
    hit = report.fmt("cache_hit_ratio", OUT["cache_hit_ratio"])
    for key in report.LATENCY_KEYS:
        assert f"{report.fmt(key, OUT[key])} (cache hit ratio {hit})" in text, key
    md = report.render_markdown(OUT, commands=COMMANDS, workload={"zipfS": 1.1}, profile={"stages": []})
    for key in report.LATENCY_KEYS:
        assert f"{report.fmt(key, OUT[key])} (cache hit ratio {hit})" in md, key


def test_failures_and_unmeasured_values_are_visible() -> None:
    out = copy.deepcopy(OUT)
    out["p95_latency_ms"] = 512.0
    out["llm_cost_per_1k_tokens_usd"] = None
    out["threshold_results"]["p95_latency_ms"] = False
    out["threshold_results"]["llm_cost_per_1k_tokens_usd"] = False
    out["thresholds_passed"] = False
    out["grafana_url"] = "http://127.0.0.1:3000"
    text = report.render_html(out, None, commands=COMMANDS)
    assert "TARGETS NOT MET" in text and "ALL TARGETS MET" not in text
    assert text.count(">FAIL<") == 2
    assert "n/a" in text  # unmeasured is n/a, never $0
    assert "No time series" in text
    assert "http://127.0.0.1:3000" in text
    md = report.render_markdown(out, commands=COMMANDS, workload={}, profile={})
    assert "targets NOT met" in md and "| FAIL |" in md


def test_markdown_states_method() -> None:
    md = report.render_markdown(
        OUT,
        commands=COMMANDS,
        workload={"personas": 50, "topics": 5000, "zipfS": 1.1, "seed": 42},
        profile={"startRate": 10, "stages": [{"duration": "10s", "target": 50}]},
    )
    assert "Zipf-distributed (exponent s = 1.1)" in md
    assert "50 personas x 5000 topics" in md
    assert "first 5 s are tagged `phase=warmup`" in md
    assert "2 cores, Test CPU <b>9000</b>" in md
    assert "make demo STACK=dev PROFILE=smoke" in md
    assert "p95 122.0 ms (k6) vs 123.45 ms (Prometheus)" in md


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("error_rate", 0.0025, "0.25 %"),
        ("p95_latency_ms", 123.456, "123.5 ms"),
        ("llm_cost_usd", 12.5, "$12.50"),
        ("llm_cost_per_1k_tokens_usd", 0.0005, "$0.000500"),
        ("achieved_qps", 48.04, "48.0/s"),
        ("tasks_lost", None, "n/a"),
        ("tasks_lost", 0, "0"),
    ],
)
def test_formatting(key: str, value: Any, text: str) -> None:
    assert report.fmt(key, value) == text


def test_chart_scales_and_marks_warmup() -> None:
    svg = report.svg_chart(
        "t", {"a": [(0.0, 1.0), (10.0, 3.0)]}, unit="ms", x_max=10, warmup_s=2, hline=(2.0, "target")
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "warm-up (excluded)" in svg and "target" in svg
    off = report.svg_chart("t", {"a": [(0.0, 1.0)]}, unit="ms", hline=(400.0, "p95 target"))
    assert "(off scale)" in off  # a far-away target does not flatten the data
    empty = report.svg_chart("t", {"a": []})
    assert "(no data)" in empty


def test_notes_and_errors_by_status_are_shown() -> None:
    out = {
        **OUT,
        "errors_by_status": {"503": 12, "0": 3},
        "rejected_by_reason": {"queue_wait": 10, "store": 2},
        "notes": ["completion_p95_ms is at least 120000"],
    }
    text = report.render_html(out, None, commands=COMMANDS)
    assert "Failed requests by status (0 = no response): 0: 3, 503: 12" in text
    assert "by reason (run and drain, all routes): queue_wait: 10, store: 2" in text
    assert "completion_p95_ms is at least 120000" in text
    md = report.render_markdown(out, commands=COMMANDS, workload={}, profile={})
    assert "0: 3, 503: 12" in md and "Note: completion_p95_ms is at least 120000" in md
    assert "queue_wait: 10, store: 2" in md


def test_lower_bounds_are_marked() -> None:
    out = {**OUT, "completion_p95_ms": 120000.0, "lower_bounds": ["completion_p95_ms"]}
    assert report.show(out, "completion_p95_ms") == "≥ 120000.0 ms"
    assert report.show(out, "p95_latency_ms") == "123.5 ms"
    assert "≥ 120000.0 ms" in report.render_html(out, None, commands=COMMANDS)


# ---------------------------------------------------------------- flow profiles, backlog, concurrency limit

FLOW_OUT: dict[str, Any] = {
    **copy.deepcopy(OUT),
    "profile": "flow",
    "flow": True,
    "time_to_post_p50_ms": 1234.5,
    "time_to_post_p95_ms": 2345.6,
    "flows": 500,
    "flows_by_outcome": {"done": 498, "timeout": 2},
    "flow_failed_rate": 0.004,
    "polls": 3000,
    "poll_error_rate": 0.0,
    "poll_p95_latency_ms": 4.5,
    "backlog_peak": 41,
    "backlog_drain_s": 3.5,
}
FLOW_OUT["thresholds"] = {**OUT["thresholds"], "time_to_post_p95_ms": 2500.0, "flow_failed_rate": 0.01}
FLOW_OUT["threshold_results"] = {**OUT["threshold_results"], "time_to_post_p95_ms": True, "flow_failed_rate": True}
FLOW_SERIES: dict[str, Any] = {
    **SERIES,
    "last_arrival_s": 28.0,
    "time_to_post_p50_ms": [(float(t), 1200.0) for t in range(31)],
    "time_to_post_p95_ms": [(float(t), 2300.0 + t) for t in range(31)],
    "backlog": [(float(t), float(min(t, 40))) for t in range(35)],
    "queue_depth": [(float(t), float(min(t, 30))) for t in range(35)],
    "llm_inflight": [(float(t), 8.0) for t in range(35)],
    "llm_concurrency_limit": [(float(t), 16.0) for t in range(35)],
}


def _chart(text: str, title: str) -> str:
    match = re.search(r"<svg[^>]*>(?:(?!</svg>).)*" + re.escape(title) + r".*?</svg>", text)
    assert match, f"no chart titled {title!r}"
    return match.group(0)


def test_flow_report_plots_time_to_post_and_the_concurrency_limit() -> None:
    text = report.render_html(FLOW_OUT, FLOW_SERIES, commands=COMMANDS)
    ttp = _chart(text, "Time to post")
    assert "p95 target" in ttp and "last arrival" in ttp and ttp.count("<path") == 2
    limit = _chart(text, "LLM concurrency")
    assert "concurrency limit" in limit and "not exported" not in limit and limit.count("<path") == 3
    assert "peak 41, drained in 3.5 s" in _chart(text, "Queue backlog")
    for label, value in (
        ("Time to post p95 (client flow)", "2345.6 ms"),
        ("Flows failed or timed out", "0.40 %"),
    ):
        assert re.search(re.escape(label) + r".*?" + re.escape(value), text), label
    for key in ("time_to_post_p50_ms", "time_to_post_p95_ms", "backlog_peak", "backlog_drain_s", "polls"):
        assert f"<code>{key}</code>" in text, key
    md = report.render_markdown(
        FLOW_OUT, commands=COMMANDS, workload={}, profile={"pollMs": 250, "flowTimeoutS": 30.0, "stages": []}
    )
    assert "polls GET /task/{id} every 250 ms" in md and "p95 2345.6 ms" in md and "3000 measured polls" in md
    assert "peak 41; back to 0 3.5 s after the last arrival" in md


def test_an_absent_concurrency_limit_is_said_not_failed() -> None:
    series = {k: v for k, v in FLOW_SERIES.items() if k != "llm_concurrency_limit"}
    limit = _chart(report.render_html(FLOW_OUT, series, commands=COMMANDS), "LLM concurrency")
    assert "concurrency limit (not exported)" in limit and limit.count("<path") == 2


def test_outside_flow_profiles_time_to_post_is_not_plotted_and_says_why() -> None:
    text = report.render_html({**OUT, "backlog_peak": None, "backlog_drain_s": None}, SERIES, commands=COMMANDS)
    assert "Time to post (client" not in text  # no chart
    assert "n/a (flow profiles only)" in text
    assert "peak n/a, drained in n/a" in _chart(text, "Queue backlog")
    assert "Time to post" not in "".join(label for label, *_ in report.threshold_rows(OUT))


def test_refusals_are_plotted_over_time_by_reason() -> None:
    series = {**SERIES, "rejected_loop_lag_per_s": [(20.0, 0.0), (21.0, 35.0), (22.0, 0.0)]}
    chart = _chart(report.render_html(OUT, series, commands=COMMANDS), "Refused by the service")
    assert chart.count("<path") == 1  # the one reason with points; the others say "no data"
    assert "loop_lag" in chart and "overload" in chart and "no data" in chart
