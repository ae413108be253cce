"""Every Prometheus metric the service exports, in one place.

These names are a contract: the dashboards (``dashboards/``), the Prometheus rules and the
measurement code (``loadtest/measure.py``) query them. No persona or topic ever becomes a label
(unbounded cardinality). With several API processes prometheus-client runs in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` set), so every gauge declares how its per-process values combine.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# 1 ms .. 10 s, dense where the 400 ms target sits.
HTTP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.35,
    0.4,
    0.45,
    0.5,
    0.6,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
)
# LLM calls and task completion take seconds, not milliseconds.
SLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 32)

# --- HTTP (API processes) ---
HTTP_REQUEST_DURATION = Histogram(
    "loadproof_http_request_duration_seconds",
    "Server-side HTTP latency, from request start to response end.",
    ["route", "method", "status"],
    buckets=HTTP_BUCKETS,
)
HTTP_REQUESTS = Counter("loadproof_http_requests", "HTTP requests served.", ["route", "method", "status"])
HTTP_INFLIGHT = Gauge("loadproof_http_requests_inflight", "HTTP requests in flight.", multiprocess_mode="livesum")
# Why requests were refused: overload (max_inflight), queue_wait, loop_lag, too_large, body_timeout
# (service.guard), store (the task store down or busy: service.api).
REJECT_REASONS = ("overload", "queue_wait", "loop_lag", "store", "too_large", "body_timeout")
# The service's own 503s (load it refused, or a store it could not reach); the rest are a client's bad request.
REFUSAL_REASONS = ("overload", "queue_wait", "loop_lag", "store")
HTTP_REJECTED = Counter("loadproof_http_rejected", "Requests refused, by reason.", ["reason"])
HTTP_LOOP_LAG = Gauge(
    "loadproof_http_loop_lag_seconds",
    "Smallest event-loop lag seen over the last lag-shedding window (service.guard.OverloadShedder).",
    multiprocess_mode="livemax",
)
HTTP_SHED_SHARE = Gauge(
    "loadproof_http_shed_share",
    "Share of new requests answered 503 because of event-loop lag (0 = none).",
    multiprocess_mode="livemax",
)

# --- Cache ---
CACHE_LOOKUPS = Counter(
    "loadproof_cache_lookups", "Cache lookups by result; a Redis failure counts as a miss.", ["result"]
)  # result: hit|miss
CACHE_LOCAL_HITS = Counter(
    "loadproof_cache_local_hits", "Cache hits answered from the process's own memory (also counted as hits)."
)
CACHE_STALE_HITS = Counter(
    "loadproof_cache_stale_hits",
    "Local hits served past their TTL because Redis was unavailable (also counted as local hits).",
)
CACHE_ERRORS = Counter("loadproof_cache_errors", "Redis failures seen by the cache.", ["op"])  # get|set
CACHE_BREAKER_OPEN = Gauge(
    "loadproof_cache_breaker_open", "1 while the cache circuit breaker is open.", multiprocess_mode="max"
)

# --- Tasks and queue ---
TASKS = Counter(
    "loadproof_tasks", "Task lifecycle events.", ["event"]
)  # accepted|coalesced|completed|failed|retried|dead_lettered|reclaimed|claimed_direct
TASK_COMPLETION = Histogram(
    "loadproof_task_completion_seconds",
    "Time from acceptance (202) to the stored result.",
    buckets=SLOW_BUCKETS,
)
QUEUE_DEPTH = Gauge("loadproof_queue_depth", "Entries in the task stream not yet delivered.", multiprocess_mode="max")
QUEUE_PENDING = Gauge("loadproof_queue_pending", "Entries delivered but not yet acknowledged.", multiprocess_mode="max")

# --- Database pool ---
DB_POOL_IN_USE = Gauge("loadproof_db_pool_in_use", "Checked-out connections.", multiprocess_mode="livesum")
DB_POOL_OVERFLOW = Gauge("loadproof_db_pool_overflow", "Connections open above pool_size.", multiprocess_mode="livesum")
DB_POOL_WAITERS = Gauge("loadproof_db_pool_waiters", "Callers waiting for a connection.", multiprocess_mode="livesum")
DB_POOL_WAIT = Histogram("loadproof_db_pool_wait_seconds", "Time spent acquiring a connection.", buckets=HTTP_BUCKETS)
ACCEPT_GROUP_SIZE = Histogram(
    "loadproof_accept_group_size",
    "New tasks written per group commit (one INSERT, one XADD script call).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

# --- LLM ---
LLM_REQUESTS = Counter(
    "loadproof_llm_requests", "LLM HTTP calls by outcome.", ["model", "outcome"]
)  # outcome: ok|rate_limited|server_error|timeout|bad_response|breaker_open
LLM_DURATION = Histogram(
    "loadproof_llm_request_duration_seconds", "Latency of one LLM call.", ["model"], buckets=SLOW_BUCKETS
)
LLM_BATCH_SIZE = Histogram("loadproof_llm_batch_size", "Items per LLM call.", buckets=BATCH_BUCKETS)
LLM_TOKENS = Counter("loadproof_llm_tokens", "Billed tokens from `usage`.", ["model", "type"])  # input|output
LLM_COST = Counter("loadproof_llm_cost_usd", "USD spent on LLM calls, priced per model.", ["model"])
WORKER_YIELDING = Gauge(
    "loadproof_worker_yielding",
    "1 while an API process sheds for overload and this worker holds at most worker_pressure_batches batches.",
    multiprocess_mode="max",
)
LLM_BREAKER_OPEN = Gauge(
    "loadproof_llm_breaker_open", "1 while the LLM circuit breaker is open.", multiprocess_mode="max"
)
LLM_INFLIGHT = Gauge("loadproof_llm_inflight", "LLM calls in flight.", multiprocess_mode="livesum")
# The adaptive limiter (service/limiter.py). Each worker process has its own limit, so they add up.
LLM_CONCURRENCY_LIMIT = Gauge(
    "loadproof_llm_concurrency_limit", "Current concurrency limit of LLM calls.", multiprocess_mode="livesum"
)
# Remaining budget as this process sees it (the tighter of its configured share and the provider's
# x-ratelimit-remaining-*). The provider's figure is one account-wide number that every process sees,
# so summing would count it once per process: min shows the most constrained process (0 = it waits).
LLM_BUDGET_REMAINING = Gauge(
    "loadproof_llm_budget_remaining",
    "Requests or tokens left in the rate budget before the limiter waits.",
    ["kind"],  # requests|tokens
    multiprocess_mode="livemin",
)
LLM_CONCURRENCY_WAITS = Counter(
    "loadproof_llm_concurrency_waits",
    "LLM calls that waited for the limiter, by what held them first.",
    ["reason"],  # concurrency|requests|tokens|rate_limited
)

# Post tokens handed to clients, cache hits included (billed at $0): effective cost per 1k
# delivered tokens = sum(llm_cost) / sum(tokens_delivered) * 1000.
TOKENS_DELIVERED = Counter(
    "loadproof_tokens_delivered", "Output tokens of posts delivered to clients.", ["source"]
)  # llm|cache
