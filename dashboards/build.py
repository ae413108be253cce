"""Grafana dashboards as code (grafana-foundation-sdk), generated at build time, never committed.

Every expression comes from :mod:`common.queries`; panel titles carry the stack-output word
(``p95_latency_ms``, ``achieved_qps`` ...) so a number on screen can be matched to the report.

Headline stat panels are *instant* queries over ``$__range``: each shows the value over the whole
selected time range (set the range to the measured window to compare with the report), never the
last few seconds. Time series use ``$__rate_interval``.

``python -m dashboards.build --out DIR [--stack dev]`` writes one JSON file per dashboard;
:func:`all_dashboards` returns the same documents for the Grafana ConfigMap.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from common import queries as q
from common.grafana_config import DATASOURCE_UID
from common.stackconfig import ThresholdsConfig, load

OVERVIEW_UID = "loadproof-overview"
INTERNALS_UID = "loadproof-service-internals"
TAGS = ["loadproof"]
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
RANGE = "$__range"  # stat panels: the whole selected time range
RATE = "$__rate_interval"  # time series: the smallest safe rate() window
MEASURED = q.MEASURED_PHASE  # headline client stats: warm-up excluded, like the report

GREEN, RED, NEUTRAL = "green", "red", "blue"

Target = tuple[str, str]  # (legend, expr)


class _Panels:
    """Assigns stable panel ids in declaration order, so links like ``viewPanel=3`` keep working."""

    def __init__(self) -> None:
        self._next = 1

    def id(self) -> int:
        value = self._next
        self._next += 1
        return value


def _target(ref: str, expr: str, legend: str, *, instant: bool) -> prometheus.Dataquery:
    query = prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend).datasource(DATASOURCE)
    return query.instant() if instant else query.range()


def _thresholds(bad_at: float | None, *, bad_below: bool = False) -> dashboard.ThresholdsConfig:
    """Green/red split at the target (red from ``bad_at`` upwards, or below it); neutral without one."""
    if bad_at is None:
        steps = [dm.Threshold(value=None, color=NEUTRAL)]
    elif bad_below:
        steps = [dm.Threshold(value=None, color=RED), dm.Threshold(value=bad_at, color=GREEN)]
    else:
        steps = [dm.Threshold(value=None, color=GREEN), dm.Threshold(value=bad_at, color=RED)]
    return dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


def _stat(
    ids: _Panels,
    title: str,
    expr: str,
    unit: str,
    description: str,
    *,
    bad_at: float | None = None,
    decimals: int | None = None,
) -> stat.Panel:
    panel = (
        stat.Panel()
        .id(ids.id())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(_target("A", expr, title, instant=True))
        .unit(unit)
        .thresholds(_thresholds(bad_at))
        .color_mode(cm.BigValueColorMode.BACKGROUND if bad_at is not None else cm.BigValueColorMode.VALUE)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .no_value("no data")
        .height(4)
        .span(8)
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    return panel


def _series(
    ids: _Panels,
    title: str,
    targets: Sequence[Target],
    unit: str,
    description: str,
    *,
    target_line: float | None = None,
    min_zero: bool = True,
    span: int = 12,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .id(ids.id())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .line_width(1)
        .fill_opacity(10)
        .span_nulls(False)
        .legend(
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .height(8)
        .span(span)
    )
    for i, (legend, expr) in enumerate(targets):
        panel = panel.with_target(_target(chr(ord("A") + i), expr, legend, instant=False))
    if min_zero:
        panel = panel.min(0)
    if target_line is not None:
        panel = panel.thresholds(_thresholds(target_line)).thresholds_style(
            common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED)
        )
    return panel


def _testid_variable() -> dashboard.QueryVariable:
    """k6 runs present in Prometheus, newest first when ids sort by time; "All" = every run."""
    return (
        dashboard.QueryVariable("testid")
        .label("k6 test id")
        .description("The k6 run (testid tag) the client-side panels show.")
        .datasource(DATASOURCE)
        .query(f"label_values({q.K6_HTTP_REQS}, {q.K6_TESTID_LABEL})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_DESC)
        .include_all(True)
        .all_value(".*")
        .multi(False)
        .allow_custom_value(False)
    )


def _links() -> dashboard.DashboardLink:
    """A dropdown to the other loadproof dashboards, keeping the time range (and the testid)."""
    return (
        dashboard.DashboardLink("loadproof")
        .type(dm.DashboardLinkType.DASHBOARDS)
        .tags(TAGS)
        .as_dropdown(True)
        .keep_time(True)
        .include_vars(True)
    )


def _encode(built: Any) -> dict[str, Any]:
    return json.loads(JSONEncoder(sort_keys=True).encode(built))


def overview(thresholds: ThresholdsConfig) -> dict[str, Any]:
    """Headline numbers against the targets, then how they moved during the run."""
    ids = _Panels()
    t = q.TESTID_VARIABLE
    p95_ms, err, cost = thresholds.p95_ms, thresholds.error_rate, thresholds.cost_per_1k_tokens_usd
    d = (
        dashboard.Dashboard("loadproof / Overview")
        .uid(OVERVIEW_UID)
        .tags(TAGS)
        .description("Measured headline numbers of loadproof against its targets.")
        .readonly()
        .time("now-30m", "now")
        .refresh("10s")
        .timezone("utc")
        .link(_links())
        .with_variable(_testid_variable())
        .with_row(dashboard.Row("Headline numbers over the selected time range").id(ids.id()))
        .with_panel(
            _stat(
                ids,
                "p95_latency_ms (client, k6, measured phase)",
                q.p95_latency_ms(RANGE, t, MEASURED),
                "ms",
                "p95 of the k6 requests of the measured phase (warm-up excluded) in the range, as the client "
                f"saw them. Red at >= {p95_ms:g} ms.",
                bad_at=p95_ms,
                decimals=0,
            )
        )
        .with_panel(
            _stat(
                ids,
                "server_p95_latency_ms",
                q.server_p95_latency_ms(RANGE),
                "ms",
                "p95 of POST /task measured in the service (no network, no client queueing); "
                f"interpolated within histogram buckets. Red at >= {p95_ms:g} ms.",
                bad_at=p95_ms,
                decimals=0,
            )
        )
        .with_panel(
            _stat(
                ids,
                "achieved_qps",
                q.achieved_qps(RANGE, t),
                "reqps",
                "Requests k6 completed per second, averaged over the range (ramps included): "
                "the load actually served, not the configured arrival rate.",
                decimals=0,
            )
        )
        .with_panel(
            _stat(
                ids,
                "peak_qps (30 s average)",
                q.peak_qps(RANGE, t),
                "reqps",
                "Highest 30-second average of k6 throughput inside the range: the sustained peak the "
                "service delivered (compare with the profile's top arrival rate).",
                decimals=0,
            )
        )
        .with_panel(
            _stat(
                ids,
                "error_rate (client, k6, measured phase)",
                q.error_rate(RANGE, t, MEASURED),
                "percentunit",
                "Failed / all k6 requests of the measured phase (bad status, timeout, connection error). "
                f"Red at >= {err:.2%}.",
                bad_at=err,
                decimals=2,
            )
        )
        .with_panel(
            _stat(
                ids,
                "cache_hit_ratio",
                q.cache_hit_ratio(RANGE),
                "percentunit",
                "hits / (hits + misses) of the response cache; a Redis failure counts as a miss.",
                decimals=1,
            )
        )
        .with_panel(
            _stat(
                ids,
                "llm_cost_per_1k_tokens_usd",
                q.llm_cost_per_1k_tokens_usd(RANGE),
                "currencyUSD",
                f"Effective: LLM spend / tokens delivered to clients (cache hits cost $0) x 1000. Red at >= ${cost:g}.",
                bad_at=cost,
                decimals=5,
            )
        )
        .with_panel(
            _stat(
                ids,
                "dropped_iterations",
                q.dropped_iterations(RANGE, t),
                "short",
                "Arrivals k6 could not start (VU ceiling). Above 0, the offered load was lower than configured.",
                bad_at=1,
                decimals=0,
            )
        )
        .with_panel(
            _stat(
                ids,
                "completion_p95_ms",
                q.completion_p95_ms(RANGE),
                "ms",
                "p95 from a task's acceptance (202) to its stored result: the asynchronous LLM work.",
                decimals=0,
            )
        )
        .with_row(dashboard.Row("Over time").id(ids.id()))
        .with_panel(
            _series(
                ids,
                "Latency percentiles (p95_latency_ms, server_p95_latency_ms)",
                [
                    ("client p50", q.latency_quantile_ms(0.5, RATE, t)),
                    ("client p95", q.p95_latency_ms(RATE, t)),
                    ("client p99", q.latency_quantile_ms(0.99, RATE, t)),
                    ("server p95", q.server_p95_latency_ms(RATE)),
                    ("server p99", q.server_latency_quantile_ms(0.99, RATE)),
                ],
                "ms",
                f"Client (k6) and server percentiles; dashed line = the {p95_ms:g} ms target.",
                target_line=p95_ms,
            )
        )
        .with_panel(
            _series(
                ids,
                "Throughput (achieved_qps)",
                [("achieved_qps (k6)", q.achieved_qps(RATE, t)), ("server_qps POST /task", q.server_qps(RATE))],
                "reqps",
                "Requests per second completed by k6 and answered by the service.",
            )
        )
        .with_panel(
            _series(
                ids,
                "Errors (error_rate, server_error_rate)",
                [
                    ("error_rate (k6)", q.error_rate(RATE, t)),
                    ("server_error_rate (5xx)", q.server_error_rate(RATE)),
                ],
                "percentunit",
                f"Failed fraction; dashed line = the {err:.2%} target.",
                target_line=err,
            )
        )
        .with_panel(
            _series(
                ids,
                "Responses by status",
                [("{{route}} {{status}}", q.requests_by_status(RATE))],
                "reqps",
                "Every route's answers per second by HTTP status (server side).",
            )
        )
        .with_panel(
            _series(
                ids,
                "cache_hit_ratio",
                [("cache_hit_ratio", q.cache_hit_ratio(RATE))],
                "percentunit",
                "Share of lookups served from Redis.",
            )
        )
        .with_panel(
            _series(
                ids,
                "LLM cost (llm_cost_per_1k_tokens_usd)",
                [
                    ("effective per 1k delivered", q.llm_cost_per_1k_tokens_usd(RATE)),
                    ("billed per 1k billed", q.billed_cost_per_1k_tokens_usd(RATE)),
                ],
                "currencyUSD",
                f"Effective vs billed cost per 1k tokens; dashed line = the ${cost:g} target.",
                target_line=cost,
            )
        )
        .with_panel(
            _series(
                ids,
                "LLM spend (llm_spend_usd per hour)",
                [("USD/hour", q.llm_spend_usd_per_hour(RATE))],
                "currencyUSD",
                "Spend rate priced per model from `usage`.",
            )
        )
        .with_panel(
            _series(
                ids,
                "k6 load (dropped_iterations, VUs)",
                [("VUs", q.k6_vus(t)), ("dropped_iterations/s", q.dropped_iterations_per_s(RATE, t))],
                "short",
                "Active k6 VUs and iterations k6 could not start per second.",
            )
        )
    )
    return _encode(d.build())


def service_internals() -> dict[str, Any]:
    """Where time and money go inside the service: pool, queue, LLM calls, batching, breakers."""
    ids = _Panels()
    d = (
        dashboard.Dashboard("loadproof / Service internals")
        .uid(INTERNALS_UID)
        .tags(TAGS)
        .description("Database pool, queue, LLM calls, batching, tokens, breakers and in-flight work.")
        .readonly()
        .time("now-30m", "now")
        .refresh("10s")
        .timezone("utc")
        .link(_links())
        .with_row(dashboard.Row("Database pool").id(ids.id()))
        .with_panel(
            _series(
                ids,
                "DB pool (db_pool_in_use, db_pool_overflow, db_pool_waiters)",
                [
                    ("in use", q.db_pool_in_use()),
                    ("overflow", q.db_pool_overflow()),
                    ("waiters", q.db_pool_waiters()),
                ],
                "short",
                "Connections checked out and above pool_size, and callers waiting (> 0: the pool is the bottleneck).",
            )
        )
        .with_panel(
            _series(
                ids,
                "db_pool_wait_p95_ms",
                [("p95 acquire", q.db_pool_wait_p95_ms(RATE))],
                "ms",
                "p95 time to acquire a connection.",
            )
        )
        .with_row(dashboard.Row("Queue and tasks").id(ids.id()))
        .with_panel(
            _series(
                ids,
                "Queue (queue_depth, queue_pending)",
                [("depth (not delivered)", q.queue_depth()), ("pending (not acked)", q.queue_pending())],
                "short",
                "A growing depth means workers fall behind the accepted load.",
            )
        )
        .with_panel(
            _series(
                ids,
                "Tasks by event",
                [("{{event}}", q.tasks_per_s(RATE))],
                "ops",
                "Task lifecycle events per second (accepted, coalesced, completed, failed, retried, ...).",
            )
        )
        .with_panel(
            _series(
                ids,
                "completion_p95_ms",
                [
                    ("p50", q.completion_quantile_ms(0.5, RATE)),
                    ("p95", q.completion_p95_ms(RATE)),
                ],
                "ms",
                "Acceptance (202) to stored result.",
            )
        )
        .with_panel(
            _series(
                ids,
                "HTTP in flight and rejected",
                [("in flight", q.http_inflight()), ("rejected/s {{reason}}", q.rejected_per_s(RATE))],
                "short",
                "Requests being handled, and requests refused before handling by reason.",
            )
        )
        .with_row(dashboard.Row("LLM").id(ids.id()))
        .with_panel(
            _series(
                ids,
                "LLM calls by outcome",
                [("{{outcome}}", q.llm_calls_per_s(RATE))],
                "ops",
                "LLM HTTP calls per second by outcome; retries make this differ from task failures.",
            )
        )
        .with_panel(
            _series(
                ids,
                "llm_p95_ms and LLM in flight",
                [("p95 call ms", q.llm_p95_ms(RATE)), ("in flight", q.llm_inflight())],
                "short",
                "Latency of one LLM call (ms) and concurrent calls.",
            )
        )
        .with_panel(
            _series(
                ids,
                "LLM batch size",
                [("mean", q.llm_batch_size_mean(RATE)), ("p95", q.llm_batch_size_p95(RATE))],
                "short",
                "Items per LLM call: how well batching fills.",
            )
        )
        .with_panel(
            _series(
                ids,
                "Tokens (billed, delivered)",
                [
                    ("billed {{type}}", q.llm_tokens_per_s(RATE)),
                    ("delivered from {{source}}", q.tokens_delivered_per_s(RATE)),
                ],
                "short",
                "Tokens per second billed by the LLM and delivered to clients (cache included).",
            )
        )
        .with_row(dashboard.Row("Resilience").id(ids.id()))
        .with_panel(
            _series(
                ids,
                "Circuit breakers open",
                [("{{breaker}}", q.breakers_open())],
                "short",
                "1 while a breaker is open: cache lookups skipped, or LLM calls refused.",
            )
        )
        .with_panel(
            _series(
                ids,
                "Cache errors",
                [("{{op}}", q.cache_errors_per_s(RATE))],
                "ops",
                "Redis failures seen by the cache per operation (counted as misses, never failing requests).",
            )
        )
    )
    return _encode(d.build())


def all_dashboards(thresholds: ThresholdsConfig | None = None) -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON; thresholds default to :class:`ThresholdsConfig`'s defaults."""
    t = thresholds or ThresholdsConfig.model_validate({})
    return {"overview.json": overview(t), "service-internals.json": service_internals()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write loadproof's Grafana dashboards as JSON files.")
    parser.add_argument("--out", type=Path, required=True, help="Output directory.")
    parser.add_argument("--stack", default=None, help="Take thresholds from Pulumi.<stack>.yaml (default: built-in).")
    args = parser.parse_args(argv)
    thresholds = load(args.stack).loadtest.thresholds if args.stack else None
    args.out.mkdir(parents=True, exist_ok=True)
    for name, doc in all_dashboards(thresholds).items():
        (args.out / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(args.out / name)


if __name__ == "__main__":
    main()
