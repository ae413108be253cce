"""Every runtime knob of the service, read once from ``LOADPROOF_*`` environment variables.

The same knobs appear in ``Pulumi.<stack>.yaml``; ``common/stackconfig.py`` maps stack config to
these variables for both the local demo and the Kubernetes Deployments, so a setting means the same
thing everywhere. Defaults are the optimized configuration; the baseline for before/after runs is
``cache_enabled=false, db_pool_mode=null, batch_size=1, coalesce_enabled=false,
accept_group_commit=false, cache_lookup_batching=false``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings. Each field is documented because the settings table in docs/settings.md is built from it."""

    model_config = SettingsConfigDict(env_prefix="LOADPROOF_", extra="ignore", frozen=True)

    # --- HTTP server ---
    host: str = Field(default="127.0.0.1", description="Address the orchestrator binds to.")
    port: int = Field(default=8080, description="Port of the orchestrator API.")
    processes: int = Field(default=1, ge=1, description="uvicorn worker processes for the API.")
    max_inflight: int = Field(
        default=256, ge=1, description="Requests in flight per API process before new ones get 503 + Retry-After."
    )
    overload_lag_ms: float = Field(
        default=10.0,
        ge=0,
        description="Event-loop lag target: while the smallest lag seen over `overload_interval_ms` stays above "
        "it, a growing share of new requests gets 503 + Retry-After (0 turns lag shedding off; `max_inflight` "
        "always applies).",
    )
    overload_latency_ms: float = Field(
        default=100.0,
        ge=0,
        description="Latency gate of the lag shedding: its share grows only while the p95 of the requests served "
        "in the window (from receipt to answer) is above this too, so a lagging loop that still answers in time "
        "refuses no one (0 = lag alone). The stack sets it to `orchestrator.overloadLatencyShare` of the p95 "
        "objective.",
    )
    overload_queue_ms: float = Field(
        default=100.0,
        ge=0,
        description="A request that waited longer than this for its first event-loop turn (the queue an "
        "overloaded loop builds before any middleware runs) gets 503 + Retry-After (0 = off).",
    )
    overload_slow_inflight: int = Field(
        default=0,
        ge=0,
        description="A lower in-flight limit per process that applies only while served requests are slow "
        "(their moving average above `overload_slow_ms`): sustained overload queues at most this many "
        "(0 = off, the default: 32 made the demo answer 12.6 % 503s; `max_inflight` always applies).",
    )
    overload_slow_ms: float = Field(
        default=30.0,
        gt=0,
        description="Served requests (2xx/3xx) slower than this on average (moving average, server side) "
        "put `overload_slow_inflight` in force.",
    )
    overload_signal_ttl_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long one request shed for overload keeps the workers yielding (Redis key TTL; "
        "see `worker_pressure_batches`; 0 = never signal, the default: with clients polling for their "
        "tasks, yielding kept an overload going after it ended).",
    )
    overload_interval_ms: float = Field(
        default=100.0,
        gt=0,
        description="Window of the lag shedding: the smallest lag seen in it decides whether the shed share "
        "grows or shrinks (a short stall alone never sheds).",
    )
    max_body_bytes: int = Field(default=8192, ge=256, description="Largest accepted request body; larger gets 413.")
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a request's complete headers (from connect or its first byte); slower "
        "connections are closed, so idle or slow-header clients cannot hold them.",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a request's whole body; slower gets 408 and the connection closed "
        "(a chunked body without end never holds an admission slot).",
    )
    shutdown_timeout_s: float = Field(
        default=20.0, gt=0, description="Upper bound for draining in-flight requests and batches on SIGTERM."
    )

    # --- Postgres ---
    database_url: SecretStr = Field(
        default=SecretStr("postgresql+psycopg://loadproof@127.0.0.1:5432/loadproof"),
        description="SQLAlchemy URL of the task store (psycopg 3 driver).",
    )
    db_pool_mode: Literal["queue", "null"] = Field(
        default="queue", description="`queue`: pooled connections; `null`: a new connection per use (baseline)."
    )
    db_pool_size: int = Field(default=20, ge=1, description="Connections kept open per process.")
    db_max_overflow: int = Field(default=40, ge=0, description="Extra connections allowed above the pool size.")
    db_pool_timeout_s: float = Field(default=5.0, gt=0, description="Longest wait to acquire a pooled connection.")
    db_pool_recycle_s: int = Field(default=3600, ge=1, description="Reconnect connections older than this.")
    db_pool_pre_ping: bool = Field(
        default=True,
        description="Check a pooled connection before handing it out: its socket open with nothing unread "
        "(no round trip).",
    )
    accept_group_commit: bool = Field(
        default=True,
        description="Write new tasks in groups: one INSERT and one XADD script call per group (off for the baseline).",
    )
    accept_linger_ms: float = Field(
        default=2.0, ge=0, description="Longest wait to gather new tasks into one group commit (like linger.ms)."
    )
    accept_batch_max: int = Field(default=256, ge=1, description="Largest group of new tasks per commit.")
    accept_max_writes: int = Field(
        default=1,
        ge=1,
        description="Group INSERTs of new tasks in flight per process; what arrives while that many run "
        "waits for one to end and joins the next group (1: groups grow with the load, not the writes).",
    )

    # --- Redis: cache and queue ---
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis for the cache and the task queue.")
    redis_pool_size: int = Field(default=64, ge=1, description="Connections in the blocking Redis pool per process.")
    redis_socket_timeout_s: float = Field(
        default=0.25, gt=0, description="Socket timeout for cache calls; a slow Redis is a cache miss, not a stall."
    )
    cache_enabled: bool = Field(default=True, description="Serve finished posts from Redis (off for the baseline).")
    cache_ttl_s: int = Field(default=3600, ge=1, description="Lifetime of a cached post.")
    cache_lookup_batching: bool = Field(
        default=True, description="Concurrent lookups share MGETs, one in flight per process (off for the baseline)."
    )
    cache_local_ttl_s: float = Field(
        default=5.0,
        ge=0,
        description="How long a process keeps a post it read from Redis in its own memory (0 = off); "
        "bounds how stale a post deleted from Redis can be.",
    )
    cache_local_max_entries: int = Field(
        default=10000, ge=1, description="Posts held in a process's own memory at most (oldest out first)."
    )
    cache_breaker_failures: int = Field(
        default=5, ge=1, description="Consecutive cache failures that open the cache circuit breaker."
    )
    cache_breaker_reset_s: float = Field(default=5.0, gt=0, description="How long the open cache breaker skips Redis.")
    prompt_version: str = Field(default="v1", description="Part of the cache key; bump to invalidate cached posts.")
    coalesce_enabled: bool = Field(
        default=True, description="Identical in-flight requests join one task (off for the baseline)."
    )

    # --- Queue and workers ---
    queue_stream: str = Field(default="loadproof:tasks", description="Redis stream holding queued task ids.")
    queue_group: str = Field(default="workers", description="Consumer group of the workers.")
    queue_claim_idle_ms: int = Field(
        default=30000, ge=1000, description="Entries pending longer than this are reclaimed from dead consumers."
    )
    queue_max_attempts: int = Field(default=3, ge=1, description="Deliveries before a task is dead-lettered.")
    queue_sweep_interval_s: float = Field(
        default=5.0, gt=0, description="How often a worker checks Postgres for accepted tasks missing from the stream."
    )
    queue_sweep_grace_s: float = Field(
        default=10.0, gt=0, description="Age of an unfinished task before the sweeper may re-enqueue it."
    )
    worker_concurrency: int = Field(
        default=256,
        ge=1,
        description="Upper bound of the adaptive limit of concurrent LLM calls per worker process "
        "(with `llm_limiter=fixed`, the limit itself).",
    )
    worker_pressure_batches: int = Field(
        default=1,
        ge=0,
        description="Batches in flight per worker process while an API process sheds for overload (see "
        "`overload_signal_ttl_ms`): background work yields to the requests being served.",
    )
    batch_size: int = Field(default=5, ge=1, description="Tasks per LLM call; 1 disables batching (baseline).")
    batch_wait_ms: int = Field(
        default=100, ge=0, description="Cap on the wait to fill a batch; it waits only while arrivals fill it in time."
    )
    worker_metrics_port: int = Field(default=9101, description="Port of a worker process's own /metrics.")

    # --- LLM ---
    llm_base_url: str = Field(default="http://127.0.0.1:8090/v1", description="OpenAI-compatible endpoint.")
    llm_api_key: SecretStr = Field(
        default=SecretStr("sk-simulator"), description="API key (from a Secret in the cluster)."
    )
    llm_model: str = Field(default="gpt-4o-mini", description="Model name sent to the endpoint and priced.")
    llm_max_tokens: int = Field(default=400, ge=16, description="Output token cap per item.")
    llm_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one LLM HTTP call.")
    llm_http_client: Literal["lean", "httpx"] = Field(
        default="lean",
        description="HTTP transport under the openai SDK: `lean` (asyncio + httptools, service/llmhttp.py) "
        "or `httpx` (the SDK's default: proxies, HTTP/2).",
    )
    llm_deadline_s: float = Field(default=90.0, gt=0, description="Total time budget for one call with retries.")
    llm_max_retries: int = Field(default=4, ge=0, description="Retries after a retryable failure (429/5xx/timeout).")
    llm_breaker_failures: int = Field(default=10, ge=1, description="Consecutive LLM failures that open its breaker.")
    llm_breaker_reset_s: float = Field(default=10.0, gt=0, description="How long the open LLM breaker fails fast.")
    llm_limiter: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description="`adaptive`: the concurrency limit follows the provider's latency and 429s (Gradient2 + "
        "AIMD, see docs/llm.md); `fixed`: it stays at `worker_concurrency`. Budgets apply to both.",
    )
    llm_concurrency_initial: int = Field(
        default=16, ge=1, description="Starting concurrency limit of the adaptive limiter (capped by the upper bound)."
    )
    llm_rpm: int = Field(
        default=0,
        ge=0,
        description="Requests per minute this worker process may send (its share of the provider's budget); "
        "0 = unlimited. The provider's `x-ratelimit-*` headers bind as well when present.",
    )
    llm_tpm: int = Field(
        default=0,
        ge=0,
        description="Tokens per minute this worker process may use (prompt + max_tokens per call, as OpenAI "
        "counts them); 0 = unlimited.",
    )
    llm_prices: str = Field(
        default="",
        description="Price overrides, `model=input/output` USD per 1M tokens, comma separated "
        "(e.g. `gpt-4o-mini=0.15/0.60`). Merged over the built-in table.",
    )

    # --- LLM simulator (`python -m service.simulator`) ---
    sim_host: str = Field(default="127.0.0.1", description="Simulator bind address.")
    sim_port: int = Field(default=8090, description="Simulator port.")
    sim_ttft_ms: float = Field(default=350.0, ge=0, description="Median time to first token.")
    sim_itl_ms: float = Field(default=16.0, ge=0, description="Inter-token latency (~60 output tokens/s).")
    sim_jitter: float = Field(default=0.2, ge=0, le=1, description="Bounded relative jitter on both latencies.")
    sim_output_tokens: int = Field(default=60, ge=1, description="Output tokens per generated post.")
    sim_stream_chunk_tokens: int = Field(
        default=16,
        ge=1,
        description="Output tokens per streamed chunk. Real endpoints send about 1; reading a chunk costs the "
        "worker ~0.3 ms of CPU through the SDK, which on the 2-core demo machine competes with the API.",
    )
    sim_concurrency_knee: int = Field(
        default=256, ge=1, description="Concurrent requests beyond which latency grows linearly."
    )
    sim_rpm: int = Field(
        default=0, ge=0, description="Requests per minute the simulator admits before 429 (0 = unlimited)."
    )
    sim_tpm: int = Field(
        default=0,
        ge=0,
        description="Tokens per minute (prompt + max_tokens, charged at admission) before 429 (0 = unlimited).",
    )
    sim_rate_429: float = Field(default=0.0, ge=0, le=1, description="Fraction of calls answered 429 + Retry-After.")
    sim_rate_500: float = Field(default=0.0, ge=0, le=1, description="Fraction of calls answered 500.")
    sim_rate_timeout: float = Field(default=0.0, ge=0, le=1, description="Fraction of calls that hang past timeout.")
    sim_rate_malformed: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of batch items returned malformed (tests item retry)."
    )

    # --- Metrics ---
    metrics_enabled: bool = Field(default=True, description="Export Prometheus metrics.")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; environment is read once."""
    return Settings()
