"""The service-internals dashboard: pools, cache, queue, workers and the LLM layer, for finding the bottleneck."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard

from common import queries as q
from dashboards.panels import INTERNALS_UID, RATE, TAGS, PanelIds, encode, links, series_panel


def service_internals() -> dict[str, Any]:
    """Where time and money go inside the service: pool, queue, LLM calls, batching, breakers."""
    ids = PanelIds()
    d = (
        dashboard.Dashboard("loadproof / Service internals")
        .uid(INTERNALS_UID)
        .tags(TAGS)
        .description("Database pool, queue, LLM calls, batching, tokens, breakers and in-flight work.")
        .readonly()
        .time("now-30m", "now")
        .refresh("10s")
        .timezone("utc")
        .link(links())
        .with_row(dashboard.Row("Database pool").id(ids.id()))
        .with_panel(
            series_panel(
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
            series_panel(
                ids,
                "db_pool_wait_p95_ms",
                [("p95 acquire", q.db_pool_wait_p95_ms(RATE))],
                "ms",
                "p95 time to acquire a connection.",
            )
        )
        .with_row(dashboard.Row("Queue and tasks").id(ids.id()))
        .with_panel(
            series_panel(
                ids,
                "Queue (queue_depth, queue_pending)",
                [("depth (not delivered)", q.queue_depth()), ("pending (not acked)", q.queue_pending())],
                "short",
                "A growing depth means workers fall behind the accepted load.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "LLM concurrency (llm_concurrency_limit, llm_inflight)",
                [
                    ("limit", q.llm_concurrency_limit()),
                    ("in flight", q.llm_inflight()),
                    ("waits/s {{reason}}", q.llm_concurrency_waits_per_s(RATE)),
                ],
                "short",
                "The adaptive limit of concurrent LLM calls (all workers), the calls in flight, and calls "
                "per second that waited for a slot, the RPM/TPM budget or a 429 pause. A deep queue with "
                "in flight at the limit: the limiter binds; with waits for requests/tokens: the provider's "
                "budget binds.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "LLM budget (llm_budget_remaining)",
                [("{{kind}}", q.llm_budget_remaining())],
                "short",
                "Requests and tokens left in the rate budget (configured share or the provider's "
                "x-ratelimit-remaining), in the most constrained worker process; 0 means calls wait.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "Tasks by event",
                [("{{event}}", q.tasks_per_s(RATE))],
                "ops",
                "Task lifecycle events per second (accepted, coalesced, completed, failed, retried, ...).",
            )
        )
        .with_panel(
            series_panel(
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
            series_panel(
                ids,
                "HTTP in flight and rejected",
                [("in flight", q.http_inflight()), ("rejected/s {{reason}}", q.rejected_per_s(RATE))],
                "short",
                "Requests being handled, and requests refused before handling by reason.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "Overload shedding: loop lag and shed share",
                [
                    ("loop lag (ms, smallest of the window)", q.overload_loop_lag_ms()),
                    ("shed share (%)", q.overload_shed_share_pct()),
                ],
                "short",
                "Event-loop lag per API process (the largest) and the share of new requests answered 503 "
                "because of it; target overload_lag_ms, see service.guard.OverloadShedder.",
            )
        )
        .with_row(dashboard.Row("LLM").id(ids.id()))
        .with_panel(
            series_panel(
                ids,
                "LLM calls by outcome",
                [("{{outcome}}", q.llm_calls_per_s(RATE))],
                "ops",
                "LLM HTTP calls per second by outcome; retries make this differ from task failures.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "llm_p95_ms and LLM in flight",
                [("p95 call ms", q.llm_p95_ms(RATE)), ("in flight", q.llm_inflight())],
                "short",
                "Latency of one LLM call (ms) and concurrent calls.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "LLM batch size",
                [("mean", q.llm_batch_size_mean(RATE)), ("p95", q.llm_batch_size_p95(RATE))],
                "short",
                "Items per LLM call: how well batching fills.",
            )
        )
        .with_panel(
            series_panel(
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
            series_panel(
                ids,
                "Circuit breakers open",
                [("{{breaker}}", q.breakers_open())],
                "short",
                "1 while a breaker is open: cache lookups skipped, or LLM calls refused.",
            )
        )
        .with_panel(
            series_panel(
                ids,
                "Cache errors",
                [("{{op}}", q.cache_errors_per_s(RATE))],
                "ops",
                "Redis failures seen by the cache per operation (counted as misses, never failing requests).",
            )
        )
    )
    return encode(d.build())
