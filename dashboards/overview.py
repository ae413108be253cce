"""The overview dashboard: the run's headline numbers (the stack outputs' words) and their time series."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard

from common import queries as q
from common.stackconfig import ThresholdsConfig
from dashboards.panels import (
    MEASURED,
    OVERVIEW_UID,
    RANGE,
    RATE,
    TAGS,
    PanelIds,
    encode,
    links,
    series_panel,
    stat_panel,
    testid_variable,
)


def overview(thresholds: ThresholdsConfig) -> dict[str, Any]:
    """Headline numbers against the targets, then how they moved during the run."""
    ids = PanelIds()
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
        .link(links())
        .with_variable(testid_variable())
        .with_row(dashboard.Row("Headline numbers over the selected time range").id(ids.id()))
        .with_panel(
            stat_panel(
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
            stat_panel(
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
            stat_panel(
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
            stat_panel(
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
            stat_panel(
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
            stat_panel(
                ids,
                "cache_hit_ratio",
                q.cache_hit_ratio(RANGE),
                "percentunit",
                "hits / (hits + misses) of the response cache; a Redis failure counts as a miss.",
                decimals=1,
            )
        )
        .with_panel(
            stat_panel(
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
            stat_panel(
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
            stat_panel(
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
            series_panel(
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
            series_panel(
                ids,
                "Throughput (achieved_qps)",
                [("achieved_qps (k6)", q.achieved_qps(RATE, t)), ("server_qps POST /task", q.server_qps(RATE))],
                "reqps",
                "Requests per second completed by k6 and answered by the service.",
            )
        )
        .with_panel(
            series_panel(
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
            series_panel(
                ids,
                "Responses by status",
                [("{{route}} {{status}}", q.requests_by_status(RATE))],
                "reqps",
                "Every route's answers per second by HTTP status (server side).",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "cache_hit_ratio",
                [("cache_hit_ratio", q.cache_hit_ratio(RATE))],
                "percentunit",
                "Share of lookups served from Redis.",
            )
        )
        .with_panel(
            series_panel(
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
            series_panel(
                ids,
                "LLM spend (llm_spend_usd per hour)",
                [("USD/hour", q.llm_spend_usd_per_hour(RATE))],
                "currencyUSD",
                "Spend rate priced per model from `usage`.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "k6 load (dropped_iterations, VUs)",
                [("VUs", q.k6_vus(t)), ("dropped_iterations/s", q.dropped_iterations_per_s(RATE, t))],
                "short",
                "Active k6 VUs and iterations k6 could not start per second.",
            )
        )
    )
    return encode(d.build())
