"""Shared fixtures: real Postgres, Redis and LLM simulator processes (``localstack``), one each per
test session on free ports, stopped at the end; plus helpers to run the API and a worker in-process.

Fixture names are a contract other test modules rely on: ``postgres`` (PostgresServer),
``redis_server`` (RedisServer), ``simulator`` (SimulatorServer; ``str()``/``.url`` is its URL,
``.base_url`` the ``/v1`` API, ``.stats()/.control()/.reset()``), and the function-scoped
``clean_state`` (empty tasks table, FLUSHDB, fault-free simulator with zeroed counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
import redis

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer
from service.config import Settings

# Fast simulated latencies keep tests quick; the latency model itself is unchanged, only scaled down.
SIM_FAST_ENV = {
    "LOADPROOF_SIM_TTFT_MS": "5",
    "LOADPROOF_SIM_ITL_MS": "0.1",
    "LOADPROOF_SIM_JITTER": "0.2",
    "LOADPROOF_SIM_OUTPUT_TOKENS": "60",
}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(SIM_FAST_ENV) as sim:
        yield sim


def truncate_tasks(pg: PostgresServer) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('public.tasks')").fetchone()
        if exists and exists[0]:
            conn.execute("TRUNCATE tasks")


def flush_redis(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def clean_state(postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer) -> None:
    truncate_tasks(postgres)
    flush_redis(redis_server)
    simulator.reset()


def make_settings(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, **overrides: Any
) -> Settings:
    """Settings pointing at the session's processes; test-friendly timings unless overridden."""
    values: dict[str, Any] = {
        "database_url": postgres.url,
        "redis_url": redis_server.url,
        "llm_base_url": simulator.base_url,
        "db_pool_size": 5,
        "db_max_overflow": 5,
        "batch_wait_ms": 50,
        "llm_timeout_s": 10.0,
        "llm_deadline_s": 20.0,
        "shutdown_timeout_s": 5.0,
        "queue_sweep_interval_s": 0.5,
        "queue_sweep_grace_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


def service_env(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, **overrides: Any
) -> dict[str, str]:
    """The same as ``make_settings`` as ``LOADPROOF_*`` variables, for service processes."""
    values: dict[str, Any] = {
        "DATABASE_URL": postgres.url,
        "REDIS_URL": redis_server.url,
        "LLM_BASE_URL": simulator.base_url,
        "DB_POOL_SIZE": 5,
        "DB_MAX_OVERFLOW": 5,
        "BATCH_WAIT_MS": 50,
        "LLM_TIMEOUT_S": 10,
        "LLM_DEADLINE_S": 20,
        "SHUTDOWN_TIMEOUT_S": 5,
        "QUEUE_SWEEP_INTERVAL_S": 0.5,
        "QUEUE_SWEEP_GRACE_S": 1.0,
    }
    values.update({k.upper(): v for k, v in overrides.items()})
    return {f"LOADPROOF_{k}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()}


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (lifespan included) in this process, reached through httpx's ASGI transport."""
    from service.api import create_app

    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client,
    ):
        yield client


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, consumer: str | None = None, llm: Any = None) -> AsyncIterator[Any]:
    """A worker in this process's event loop (with ``llm`` as its LLMClient if given); stopped (drained) on exit."""
    from service.worker import Worker

    worker = Worker(settings, consumer=consumer, llm=llm)
    await worker.start()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=30)


async def eventually(check: Callable[[], Awaitable[Any]], within_s: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the last value after ``within_s``."""
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within_s}s; last value: {last!r}")


def is_final(doc: dict[str, Any]) -> bool:
    """A GET /task body that will not change: failed, or done with its usage (a streamed post is
    done the moment it closes; its share of the call's usage lands when the call's stream ends)."""
    usage = doc.get("usage") or {}
    return doc.get("status") == "failed" or (doc.get("status") == "done" and usage.get("cost_usd") is not None)


async def wait_done(client: httpx.AsyncClient, task_id: str, within_s: float = 20.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        doc = (await client.get(f"/task/{task_id}")).json()
        return doc if is_final(doc) else None

    return await eventually(check, within_s)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a metric sample in this process's default registry (0 if absent)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T], *, uvloop: bool = False) -> T:
    """Run ``coro`` on a private loop (asyncio's, or uvloop's as the service runs): ``asyncio.run``
    would leave the main thread without a current loop, which later tests (Pulumi's) expect to find."""
    if uvloop:
        import uvloop as uv

        loop = uv.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
