"""Render one run's measured numbers: a self-contained ``report.html`` (inline SVG, no CDN) and ``PERFORMANCE.md``.

Everything shown comes from ``outputs.json`` (see :mod:`loadtest.measure`) and the range series
from :func:`loadtest.measure.timeseries`; nothing is typed in by hand. A number that could not be
measured is printed as "n/a", never as 0. The cache hit ratio is printed next to every latency,
because a latency measured at a 90 % hit ratio says little about a cold cache.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from service.metrics import REFUSAL_REASONS

Point = tuple[float, float]

# (key, label, unit, format, threshold key, comparison) of the headline rows.
HEADLINE: tuple[tuple[str, str, str], ...] = (
    ("p95_latency_ms", "Client p95 latency", "ms"),
    ("p99_latency_ms", "Client p99 latency", "ms"),
    ("p50_latency_ms", "Client p50 latency", "ms"),
    ("server_p95_latency_ms", "Server p95 latency (POST /task)", "ms"),
    ("achieved_qps", "Achieved QPS (measured-window average)", "req/s"),
    ("peak_achieved_qps", "Peak achieved QPS (15 s rate)", "req/s"),
    ("target_qps", "Target (peak arrival rate)", "req/s"),
    ("plateau_qps", "Achieved QPS while the peak rate was held (plateau)", "req/s"),
    ("plateau_p95_latency_ms", "Client p95 latency on the plateau", "ms"),
    ("plateau_error_rate", "Error rate on the plateau", ""),
    ("error_rate", "Error rate", ""),
    ("dropped_iterations", "Dropped iterations (whole run)", ""),
    ("cache_hit_ratio", "Cache hit ratio", ""),
    ("llm_cost_per_1k_tokens_usd", "Effective LLM cost per 1k delivered tokens", "USD"),
    ("billed_cost_per_1k_tokens_usd", "LLM cost per 1k billed tokens", "USD"),
    ("cost_per_request_usd", "LLM cost per request", "USD"),
    ("llm_cost_usd", "LLM spend (run + drain)", "USD"),
    ("llm_calls", "LLM calls", ""),
    ("llm_tokens", "LLM billed tokens", ""),
    ("completion_p95_ms", "Task completion p95 (accepted -> done)", "ms"),
    ("time_to_post_p50_ms", "Time to post p50 (client: POST -> poll that saw done; flow profiles)", "ms"),
    ("time_to_post_p95_ms", "Time to post p95 (client: POST -> poll that saw done; flow profiles)", "ms"),
    ("flow_failed_rate", "Flows failed, timed out or rejected (flow profiles)", ""),
    ("polls", "Polls of GET /task/{id} (flow profiles; not in the request figures)", ""),
    ("poll_p95_latency_ms", "Poll p95 latency (flow profiles)", "ms"),
    ("backlog_peak", "Queue backlog peak (queued + pending, sampled)", ""),
    ("backlog_drain_s", "Backlog drain: last arrival -> first sample of 0", "s"),
    ("tasks_accepted", "Tasks accepted", ""),
    ("tasks_completed", "Tasks completed", ""),
    ("tasks_failed", "Tasks failed", ""),
    ("tasks_lost", "Tasks lost", ""),
    ("tasks_pending_after_drain", "Tasks still queued after the drain", ""),
)
LATENCY_KEYS = frozenset(
    {"p50_latency_ms", "p95_latency_ms", "p99_latency_ms", "server_p95_latency_ms", "plateau_p95_latency_ms"}
)
THRESHOLD_TEXT = {
    "p95_latency_ms": "< {v:g} ms",
    "error_rate": "< {pct}",
    "plateau_p95_latency_ms": "< {v:g} ms",
    "plateau_error_rate": "< {pct}",
    "dropped_iterations": "= 0",
    "llm_cost_per_1k_tokens_usd": "< ${v:g}",
    "tasks_lost": "= 0",
    "time_to_post_p95_ms": "< {v:g} ms",
    "flow_failed_rate": "< {pct}",
}
# Keys that exist only for flow profiles: elsewhere "n/a" says why instead of looking unmeasured.
FLOW_ONLY = frozenset(
    {"time_to_post_p50_ms", "time_to_post_p95_ms", "flow_failed_rate", "polls", "poll_p95_latency_ms"}
)


def fmt(key: str, value: Any) -> str:
    """Human formatting of one output value; ``None`` is "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in ("error_rate", "plateau_error_rate", "cache_hit_ratio", "flow_failed_rate", "poll_error_rate"):
        return f"{100 * float(value):.2f} %"
    if key.endswith("_usd"):
        return f"${float(value):.6f}" if float(value) < 1 else f"${float(value):.2f}"
    if key.endswith("_ms"):
        return f"{float(value):.1f} ms"
    if key.endswith("_s"):
        return f"{float(value):.1f} s"
    if key.endswith("_qps"):
        return f"{float(value):.1f}/s"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def show(out: Mapping[str, Any], key: str) -> str:
    """``fmt`` of ``out[key]``, marked "≥" when the value is a histogram's last bucket bound (a lower bound)."""
    if key in FLOW_ONLY and not out.get("flow"):
        return "n/a (flow profiles only)"
    text = fmt(key, out.get(key))
    return f"≥ {text}" if key in (out.get("lower_bounds") or ()) else text


def target_text(key: str, thresholds: Mapping[str, Any]) -> str:
    if key not in THRESHOLD_TEXT or key not in thresholds:
        return ""
    v = thresholds[key]
    return THRESHOLD_TEXT[key].format(v=v, pct=f"{100 * float(v):g} %")


def failures(out: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The failed requests by status, and the service's own reasons for the refusals among them."""
    found = []
    if by_status := out.get("errors_by_status"):
        found.append(("Failed requests by status (0 = no response)", _pairs(by_status)))
    if by_reason := out.get("rejected_by_reason"):
        found.append(("Refused by the service, by reason (run and drain, all routes)", _pairs(by_reason)))
    return found


def failure_lines(out: Mapping[str, Any]) -> list[str]:
    return [f"{label}: {counts}" for label, counts in failures(out)]


def _pairs(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def threshold_rows(out: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(label, measured, target, passed) per judged target."""
    labels = {
        "p95_latency_ms": "Client p95 latency",
        "error_rate": "Error rate",
        "plateau_p95_latency_ms": "Client p95 at the peak rate (plateau)",
        "plateau_error_rate": "Error rate at the peak rate (plateau)",
        "dropped_iterations": "Dropped iterations",
        "llm_cost_per_1k_tokens_usd": "Cost per 1k delivered tokens",
        "tasks_lost": "Tasks lost",
        "time_to_post_p95_ms": "Time to post p95 (client flow)",
        "flow_failed_rate": "Flows failed or timed out",
    }
    rows = []
    for key, passed in out.get("threshold_results", {}).items():
        measured = show(out, key)
        if key in LATENCY_KEYS:
            measured += f" (hit ratio {fmt('cache_hit_ratio', out.get('cache_hit_ratio'))})"
        rows.append((labels.get(key, key), measured, target_text(key, out.get("thresholds", {})), bool(passed)))
    return rows


# ---------------------------------------------------------------- SVG


def _nice_max(value: float) -> float:
    if value <= 0 or math.isnan(value):
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * exp:
            return m * exp
    return 10 * exp


def svg_chart(
    title: str,
    series: Mapping[str, Sequence[Point]],
    *,
    unit: str = "",
    x_max: float | None = None,
    warmup_s: float | None = None,
    hline: tuple[float, str] | None = None,
    vline: tuple[float, str] | None = None,
    missing: str = "no data",
    width: int = 640,
    height: int = 220,
) -> str:
    """A small line chart as inline SVG (no scripts, no external resources).

    ``vline``: (x, label) of a moment to mark (e.g. the last arrival); ``missing``: what the legend
    says of a series without points.
    """
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")
    left, right, top, bottom = 60, 16, 40, 34
    pw, ph = width - left - right, height - top - bottom
    xs = [t for pts in series.values() for t, _ in pts]
    ys = [v for pts in series.values() for _, v in pts]
    data_max = max(ys) if ys else 0.0
    off_scale = hline is not None and data_max > 0 and data_max < hline[0] / 4
    if hline and not off_scale:
        ys.append(hline[0])
    xmax = x_max or (max(xs) if xs else 1.0) or 1.0
    ymax = _nice_max(max(ys) if ys else 1.0)
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{esc(title)}" class="chart">',
        f'<text x="{left}" y="16" class="ct">{esc(title)}</text>',
    ]
    for i in range(5):  # grid + y labels
        y = top + ph - ph * i / 4
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="ax" text-anchor="end">{ymax * i / 4:g}{esc(unit)}</text>'
        )
    for i in range(6):  # x labels
        x = left + pw * i / 5
        parts.append(f'<text x="{x:.1f}" y="{height - 14}" class="ax" text-anchor="middle">{xmax * i / 5:.0f}s</text>')
    if warmup_s:
        wx = left + pw * min(warmup_s / xmax, 1)
        parts.append(f'<rect x="{left}" y="{top}" width="{wx - left:.1f}" height="{ph}" class="warm"/>')
        parts.append(f'<text x="{left + 4}" y="{top + 12}" class="ax">warm-up (excluded)</text>')
    if vline and 0 <= vline[0] <= xmax:
        vx = left + pw * vline[0] / xmax
        parts.append(f'<line x1="{vx:.1f}" x2="{vx:.1f}" y1="{top}" y2="{top + ph}" class="mark"/>')
        parts.append(f'<text x="{vx - 4:.1f}" y="{top + 24}" class="ax" text-anchor="end">{esc(vline[1])}</text>')
    if hline and off_scale:  # keep the data readable; say where the target is
        parts.append(
            f'<text x="{left + pw - 4}" y="{top + 12}" class="ax" text-anchor="end">'
            f"{esc(hline[1])} {hline[0]:g}{esc(unit)} (off scale)</text>"
        )
    elif hline:
        hy = top + ph - ph * min(hline[0] / ymax, 1)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{hy:.1f}" y2="{hy:.1f}" class="target"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{hy - 4:.1f}" class="ax" text-anchor="end">{esc(hline[1])}</text>')
    legend_x = left
    for n, (name, pts) in enumerate(series.items()):
        color = colors[n % len(colors)]
        if pts:
            path = " ".join(
                f"{'M' if i == 0 else 'L'}{left + pw * min(t / xmax, 1):.1f},{top + ph - ph * min(v / ymax, 1):.1f}"
                for i, (t, v) in enumerate(pts)
            )
            parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        label = name if pts else f"{name} ({missing})"
        parts.append(f'<text x="{legend_x}" y="30" class="ax" fill="{color}">■ {esc(label)}</text>')
        legend_x += 18 + 6 * len(label)
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" class="axis"/>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,'DejaVu Sans',sans-serif;margin:2rem auto;max-width:1360px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:1rem 0} td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#0a7a2f;font-weight:600} .fail{color:#b00020;font-weight:600}
.verdict{font-size:1.3rem;padding:.6rem 1rem;border-radius:6px;display:inline-block}
.verdict.pass{background:#e5f6ea} .verdict.fail{background:#fde7ea}
.charts{display:flex;flex-wrap:wrap;gap:1rem}
svg.chart{border:1px solid #eee;background:#fff}
svg .ct{font-size:13px;font-weight:600} svg .ax{font-size:10px;fill:#555}
svg .grid{stroke:#eee} svg .axis{stroke:#888} svg .warm{fill:#f2f2f2}
svg .target{stroke:#b00020;stroke-dasharray:4 3} svg .mark{stroke:#555;stroke-dasharray:2 3}
code{background:#f4f4f4;padding:0 .2rem} .note{color:#555;font-size:.9rem}
"""


def render_html(out: Mapping[str, Any], series: Mapping[str, Any] | None, *, commands: Sequence[str] = ()) -> str:
    """The self-contained HTML report of one run."""
    esc = html.escape
    passed = bool(out.get("thresholds_passed"))
    hit = fmt("cache_hit_ratio", out.get("cache_hit_ratio"))
    machine = out.get("machine") or {}
    rows = []
    for label, measured, target, ok in threshold_rows(out):
        cls = "pass" if ok else "fail"
        rows.append(
            f"<tr><td>{esc(label)}</td><td class='num'>{esc(measured)}</td><td>{esc(target)}</td>"
            f"<td class='{cls}'>{'PASS' if ok else 'FAIL'}</td></tr>"
        )
    detail = []
    for key, label, _unit in HEADLINE:
        value = show(out, key)
        if key in LATENCY_KEYS:
            value += f" (cache hit ratio {hit})"
        detail.append(f"<tr><td>{esc(label)}</td><td><code>{key}</code></td><td class='num'>{esc(value)}</td></tr>")
    cc = out.get("k6_cross_check") or {}
    cross = (
        f"k6's own summary: p95 {fmt('x_ms', cc.get('k6_p95_ms'))}, {cc.get('k6_requests')} measured requests; "
        f"Prometheus: p95 {fmt('x_ms', cc.get('prometheus_p95_ms'))}, {cc.get('prometheus_requests')} requests "
        f"(relative p95 difference {fmt('x', cc.get('p95_relative_difference'))})."
        if cc.get("available")
        else "k6 summary not available for a cross-check."
    )
    notes = [str(n) for n in out.get("notes") or []]
    notes[:0] = failure_lines(out)
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    charts = []
    if series:
        xm = float(series.get("end_s") or 0) or None
        warm = float(series.get("warmup_s") or 0)
        thr = out.get("thresholds", {})
        charts.append(
            svg_chart(
                f"Latency (cache hit ratio {hit})",
                {
                    "client p50": series.get("p50_latency_ms", []),
                    "client p95": series.get("p95_latency_ms", []),
                    "client p99": series.get("p99_latency_ms", []),
                    "server p95": series.get("server_p95_latency_ms", []),
                },
                unit="ms",
                x_max=xm,
                warmup_s=warm,
                hline=(float(thr["p95_latency_ms"]), "p95 target") if "p95_latency_ms" in thr else None,
            )
        )
        charts.append(
            svg_chart(
                "Throughput",
                {"achieved req/s": series.get("achieved_qps", []), "target arrival rate": series.get("target_qps", [])},
                x_max=xm,
                warmup_s=warm,
            )
        )
        charts.append(
            svg_chart(
                "Error rate (%)",
                {"failed requests": [(t, 100 * v) for t, v in series.get("error_rate", [])]},
                unit="%",
                x_max=xm,
                warmup_s=warm,
            )
        )
        charts.append(
            svg_chart(
                "Refused by the service (503/s, by reason)",
                {reason: series.get(f"rejected_{reason}_per_s", []) for reason in REFUSAL_REASONS},
                x_max=xm,
                warmup_s=warm,
            )
        )
        charts.append(
            svg_chart(
                "Dropped iterations/s (arrivals k6 could not start)",
                {"dropped/s": series.get("dropped_per_s", [])},
                x_max=xm,
                warmup_s=warm,
            )
        )
        charts.append(
            svg_chart("Cache hit ratio", {"hit ratio": series.get("cache_hit_ratio", [])}, x_max=xm, warmup_s=warm)
        )
        charts.append(
            svg_chart(
                "LLM spend (cumulative, USD)",
                {"spend": series.get("llm_spend_usd_cumulative", [])},
                x_max=None,
                warmup_s=warm,
            )
        )
        last = series.get("last_arrival_s")
        arrival = (float(last), "last arrival") if last is not None else None
        if out.get("flow"):
            charts.append(
                svg_chart(
                    "Time to post (client: POST -> poll that saw done)",
                    {
                        "p50": series.get("time_to_post_p50_ms", []),
                        "p95": series.get("time_to_post_p95_ms", []),
                    },
                    unit="ms",
                    x_max=None,
                    warmup_s=warm,
                    vline=arrival,
                    hline=(float(thr["time_to_post_p95_ms"]), "p95 target") if "time_to_post_p95_ms" in thr else None,
                )
            )
        charts.append(
            svg_chart(
                f"Queue backlog (peak {show(out, 'backlog_peak')}, drained in {show(out, 'backlog_drain_s')})",
                {"backlog (queued + pending)": series.get("backlog", []), "queued": series.get("queue_depth", [])},
                x_max=None,
                warmup_s=warm,
                vline=arrival,
            )
        )
        charts.append(
            svg_chart(
                "LLM concurrency: limit, calls in flight, queue depth",
                {
                    "concurrency limit": series.get("llm_concurrency_limit", []),
                    "LLM calls in flight": series.get("llm_inflight", []),
                    "queue depth": series.get("queue_depth", []),
                },
                x_max=None,
                warmup_s=warm,
                vline=arrival,
                missing="not exported",
            )
        )
    cmd_html = "".join(f"<pre><code>{esc(c)}</code></pre>" for c in commands)
    grafana = out.get("grafana_url")
    grafana_html = (
        f"<p>Grafana: <a href='{esc(grafana)}'>{esc(grafana)}</a></p>"
        if grafana
        else "<p class='note'>No Grafana ran for this run.</p>"
    )
    verdict = "ALL TARGETS MET" if passed else "TARGETS NOT MET"
    timeout = out.get("request_timeout_s")
    timeout_note = (
        f"; a request still unanswered after {timeout} s is aborted and counted as failed (status 0), so no "
        f"latency exceeds {timeout} s"
        if timeout
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>loadproof report {esc(str(out.get("test_id")))}</title>
<style>{_CSS}</style></head><body>
<h1>loadproof — measured performance</h1>
<p class="sub">Run <code>{esc(str(out.get("test_id")))}</code>, profile <b>{esc(str(out.get("profile")))}</b>, started
{esc(str(out.get("started_at")))}, {fmt("x", out.get("duration_s"))} s (first {fmt("x", out.get("warmup_s"))} s warm-up
excluded; measured window {fmt("x", out.get("measured_window_s"))} s). Machine: {esc(str(machine.get("cores")))} cores,
{esc(str(machine.get("cpu_model")))} — k6 and the whole stack share it.</p>
<p id="verdict" class="verdict {"pass" if passed else "fail"}">{verdict}</p>
<h2>Targets</h2>
<table id="targets"><tr><th>Target</th><th>Measured</th><th>Required</th><th>Result</th></tr>{"".join(rows)}</table>
<p class="note">{esc(cross)}</p>
{f'<ul class="note" id="notes">{notes_html}</ul>' if notes_html else ""}
<h2>Over time</h2><div class="charts">{"".join(charts) or "<p>No time series.</p>"}</div>
<h2>Every number</h2>
<table id="numbers"><tr><th>Number</th><th>Key in outputs.json</th><th>Value</th></tr>{"".join(detail)}</table>
<p class="note">Client latencies are percentiles of the merged k6 histogram of measured-phase <code>POST /task</code>
requests (open model: arrivals do not wait for responses; a flow profile's polls are reported
apart){timeout_note}. Dropped iterations count arrivals k6 could not start at all; any non-zero value
means the offered load was not offered. Cost covers the run plus the drain.</p>
{grafana_html}
<h2>Reproduce</h2>{cmd_html}
</body></html>
"""


def render_markdown(
    out: Mapping[str, Any], *, commands: Sequence[str], workload: Mapping[str, Any], profile: Mapping[str, Any]
) -> str:
    """``PERFORMANCE.md``: generated from measured values only."""
    m = out.get("machine") or {}
    hit = fmt("cache_hit_ratio", out.get("cache_hit_ratio"))
    lines = [
        "# loadproof — measured performance",
        "",
        "Generated by `make demo` from measured values only (nothing typed by hand). "
        "Regenerate with the commands below.",
        "",
        f"**Verdict: {'all targets met' if out.get('thresholds_passed') else 'targets NOT met'}** "
        f"(run `{out.get('test_id')}`, profile `{out.get('profile')}`, started {out.get('started_at')}, "
        f"commit `{out.get('git_commit') or 'unknown'}`).",
        "",
        "| Target | Measured | Required | Result |",
        "|---|---|---|---|",
    ]
    for label, measured, target, ok in threshold_rows(out):
        lines.append(f"| {label} | {measured} | {target} | {'PASS' if ok else 'FAIL'} |")
    for line in failure_lines(out):
        lines += ["", line]
    for note in out.get("notes") or []:
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        "## Every number",
        "",
        "| Number | Value |",
        "|---|---|",
    ]
    for key, label, _unit in HEADLINE:
        value = show(out, key)
        if key in LATENCY_KEYS:
            value += f" (cache hit ratio {hit})"
        lines.append(f"| {label} (`{key}`) | {value} |")
    stages = ", ".join(f"{s['duration']} → {s['target']}/s" for s in profile.get("stages", []))
    cc = out.get("k6_cross_check") or {}
    lines += [
        "",
        "## How it was measured",
        "",
        f"- Machine: {m.get('cores')} cores, {m.get('cpu_model')}, {m.get('memory_gib')} GiB, {m.get('os')}. "
        "k6 and every service process share these cores, so the numbers are a floor for this hardware, "
        "not a capacity claim for a cluster.",
        f"- Load: open model (k6 `ramping-arrival-rate`), start {profile.get('startRate')}/s, stages {stages}; "
        f"peak arrival rate {out.get('target_qps')}/s. Dropped iterations (arrivals k6 could not start): "
        f"{out.get('dropped_iterations')}.",
        f"- Workload: persona ids and topics drawn Zipf-distributed (exponent s = {workload.get('zipfS')}) over "
        f"{workload.get('personas')} personas x {workload.get('topics')} topics, seeded PRNG (seed "
        f"{workload.get('seed')}) so runs are comparable"
        + (
            f"; {100 * float(profile.get('newTopics') or 0):g} % of requests carry a never-seen topic instead "
            "(each a new task: the cache cannot help)."
            if profile.get("newTopics")
            else "."
        ),
        f"- Warm-up: the first {out.get('warmup_s')} s are tagged `phase=warmup` by k6 and excluded; the measured "
        f"window is {out.get('measured_window_s')} s with {out.get('requests')} requests "
        f"({out.get('requests_including_warmup')} including warm-up).",
        "- Client percentiles come from k6's native histograms merged in Prometheus (histogram_quantile over the "
        "summed histogram), never averaged. "
        + (
            f"Cross-check against k6's own summary: p95 {cc.get('k6_p95_ms')} ms (k6) vs "
            f"{cc.get('prometheus_p95_ms')} ms (Prometheus), requests {cc.get('k6_requests')} vs "
            f"{cc.get('prometheus_requests')}."
            if cc.get("available")
            else ""
        ),
        f"- Cache hit ratio during the measured window: {hit} — read every latency above with it.",
        "- Cost: LLM spend over the run plus the drain divided by the tokens delivered to clients (cache hits "
        "deliver tokens at $0); the billed price per 1k tokens is shown separately.",
        *(
            [
                "- Client flow: each arrival POSTs /task, then polls GET /task/{id} every "
                f"{profile.get('pollMs')} ms until done or failed, for at most {profile.get('flowTimeoutS')} s. "
                "Time to post (just before the POST to the poll that saw done, measured flows that got their "
                f"post): p50 {show(out, 'time_to_post_p50_ms')}, p95 {show(out, 'time_to_post_p95_ms')}, from "
                "k6's merged histograms; "
                f"{show(out, 'flow_failed_rate')} of {out.get('flows')} measured flows failed, timed out or were "
                f"rejected ({out.get('flows_by_outcome')}). The request figures above are POST /task only; the "
                f"{out.get('polls')} measured polls had p95 {show(out, 'poll_p95_latency_ms')} and error rate "
                f"{fmt('poll_error_rate', out.get('poll_error_rate'))}."
            ]
            if out.get("flow")
            else []
        ),
        "- Queue backlog (queued + pending entries, from the queue gauges, sampled): "
        f"peak {show(out, 'backlog_peak')}; back to 0 {show(out, 'backlog_drain_s')} after the last arrival "
        "(n/a: not within the drain).",
        f"- Tasks: {out.get('tasks_accepted')} accepted, {out.get('tasks_completed')} completed, "
        f"{out.get('tasks_failed')} failed, {out.get('tasks_lost')} lost, "
        f"{out.get('tasks_pending_after_drain')} still queued after a bounded drain of {out.get('drain_s')} s.",
        "",
        "## Reproduce",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)
