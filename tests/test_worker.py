"""The worker (in-process, real Postgres/Redis/simulator): micro-batching, item retry, LLM faults,
dead-lettering; and a worker process SIGKILLed between read and ack."""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer, WorkerProcess
from service.cache import cache_key, make_redis
from service.db import Database
from service.queue import TaskQueue
from tests.conftest import eventually, make_settings, running_worker, sample, service_env

pytestmark = pytest.mark.usefixtures("clean_state")


async def _accept(settings: Any, topics: list[str]) -> list[str]:
    """What POST /task does on a miss: commit the row, then XADD."""
    db = Database(settings)
    client = make_redis(settings, socket_timeout=5.0)
    queue = TaskQueue(settings, client)
    try:
        await db.create_schema()
        await queue.ensure_group()
        ids = []
        for topic in topics:
            key = cache_key("persona", topic, settings.prompt_version)
            task_id, created, _ = await db.insert_task(str(uuid.uuid4()), "persona", topic, key, key, None)
            assert created
            assert await queue.enqueue(task_id)
            ids.append(task_id)
        return ids
    finally:
        await client.aclose()
        await db.aclose()


def _rows(pg: PostgresServer, ids: list[str]) -> dict[str, dict[str, Any]]:
    with psycopg.connect(pg.dsn) as conn:
        cur = conn.execute(
            "SELECT id::text, status, post, attempts, error, output_tokens, cost_usd FROM tasks "
            "WHERE id = ANY(%s::uuid[])",
            (ids,),
        )
        cols = [c.name for c in cur.description or []]
        return {r[0]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}


def _final(row: dict[str, Any]) -> bool:
    """Failed, or done and billed (a streamed post is stored before its call's usage arrives)."""
    return row["status"] == "failed" or (row["status"] == "done" and row["cost_usd"] is not None)


async def _all_final(pg: PostgresServer, ids: list[str]) -> dict[str, dict[str, Any]] | None:
    rows = await asyncio.to_thread(_rows, pg, ids)
    return rows if len(rows) == len(ids) and all(_final(r) for r in rows.values()) else None


async def test_twenty_tasks_batch_size_five_make_four_calls(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, batch_size=5, batch_wait_ms=200)
    ids = await _accept(settings, [f"topic {i}" for i in range(20)])
    batches_before = sample("loadproof_llm_batch_size_count")
    items_before = sample("loadproof_llm_batch_size_sum")
    delivered_before = sample("loadproof_tokens_delivered_total", {"source": "llm"})
    completed_before = sample("loadproof_tasks_total", {"event": "completed"})
    cost_before = sample("loadproof_llm_cost_usd_total", {"model": settings.llm_model})
    async with running_worker(settings):
        rows = await eventually(lambda: _all_final(postgres, ids))
    assert all(r["status"] == "done" and r["post"] for r in rows.values())
    stats = simulator.stats()
    assert stats["items"] == 20 and stats["calls"] <= 4, stats
    assert stats["items_per_call"] == {"5": 4}
    assert sample("loadproof_llm_batch_size_count") - batches_before == 4
    assert sample("loadproof_llm_batch_size_sum") - items_before == 20
    assert sample("loadproof_tasks_total", {"event": "completed"}) - completed_before == 20
    assert sample("loadproof_tokens_delivered_total", {"source": "llm"}) - delivered_before == sum(
        r["output_tokens"] for r in rows.values()
    )
    # Per-task costs add up to what the LLM calls cost.
    spent = sample("loadproof_llm_cost_usd_total", {"model": settings.llm_model}) - cost_before
    assert spent > 0 and sum(r["cost_usd"] for r in rows.values()) == pytest.approx(spent)
    # Results were cached too.
    client = make_redis(settings, socket_timeout=5.0)
    try:
        assert await client.exists(*[cache_key("persona", f"topic {i}", "v1") for i in range(20)]) == 20
    finally:
        await client.aclose()


async def test_malformed_items_are_retried_alone(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, batch_size=3, batch_wait_ms=200)
    simulator.control(script=["malformed"])  # every item of the next call comes back broken
    ids = await _accept(settings, ["a", "b", "c"])
    retried = sample("loadproof_tasks_total", {"event": "retried"})
    async with running_worker(settings):
        rows = await eventually(lambda: _all_final(postgres, ids))
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows.values()), rows
    stats = simulator.stats()
    assert stats["items_per_call"] == {"3": 1, "1": 3}, stats
    assert stats["injected"]["malformed_items"] == 3
    assert sample("loadproof_tasks_total", {"event": "retried"}) - retried == 3


async def test_rate_limited_call_is_retried_after_retry_after(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator)
    simulator.control(script=["429"], retry_after_s=1)
    limited = sample("loadproof_llm_requests_total", {"model": settings.llm_model, "outcome": "rate_limited"})
    ids = await _accept(settings, ["rate limited"])
    async with running_worker(settings):
        rows = await eventually(lambda: _all_final(postgres, ids))
    row = rows[ids[0]]
    assert row["status"] == "done" and row["attempts"] == 1
    stats = simulator.stats()
    assert stats["injected"]["429"] == 1 and stats["calls"] == 2
    assert sample("loadproof_llm_requests_total", {"model": settings.llm_model, "outcome": "rate_limited"}) == (
        limited + 1
    )


async def test_persistent_failure_is_dead_lettered_with_reason(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, llm_max_retries=0, queue_max_attempts=2)
    simulator.control(rate_500=1.0)
    dead = sample("loadproof_tasks_total", {"event": "dead_lettered"})
    ids = await _accept(settings, ["doomed"])
    async with running_worker(settings) as worker:
        rows = await eventually(lambda: _all_final(postgres, ids))

        async def acknowledged() -> bool:  # the ack follows the row update: not redelivered forever
            return await worker.queue.task_ids_in_stream() == set()

        await eventually(acknowledged, within_s=5)
    row = rows[ids[0]]
    assert row["status"] == "failed" and row["attempts"] == 2
    assert "dead-lettered after 2 attempt(s)" in row["error"] and "500" in row["error"]
    assert sample("loadproof_tasks_total", {"event": "dead_lettered"}) == dead + 1
    assert simulator.stats()["injected"]["500"] == 2


async def test_worker_killed_between_read_and_ack_task_completed_by_another(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    env = service_env(postgres, redis_server, simulator, queue_claim_idle_ms=1000, batch_wait_ms=0)
    settings = make_settings(postgres, redis_server, simulator)
    simulator.control(script=["timeout"], hang_s=60)  # the first worker's LLM call hangs
    ids = await _accept(settings, ["killed mid-flight"])
    first = WorkerProcess(env, index=1)
    second = WorkerProcess(env, index=2)
    try:
        await asyncio.to_thread(first.start, 30)

        async def read_not_acked() -> bool:
            running = (await asyncio.to_thread(_rows, postgres, ids))[ids[0]]["status"] == "running"
            return running and simulator.stats()["inflight"] == 1

        await eventually(read_not_acked)
        assert first.process is not None
        first.process.kill()  # SIGKILL: no chance to ack or clean up
        await asyncio.to_thread(second.start, 30)
        rows = await eventually(lambda: _all_final(postgres, ids), within_s=30)
        row = rows[ids[0]]
        assert row["status"] == "done" and row["attempts"] == 2
        async with httpx.AsyncClient() as http:

            async def counted() -> str | None:  # counters move right after the row is stored
                text = (await http.get(second.metrics_url, timeout=5)).text
                return text if 'loadproof_tasks_total{event="completed"} 1.0' in text else None

            metrics_text = await eventually(counted, within_s=5)
        assert 'loadproof_tasks_total{event="reclaimed"} 1.0' in metrics_text
    finally:
        await asyncio.to_thread(first.cleanup)
        await asyncio.to_thread(second.cleanup)
        simulator.reset()


async def test_worker_probes_answer_and_readiness_flips_on_drain(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """The cluster probes the worker on /healthz and /readyz: both must mean what they say."""
    worker = WorkerProcess(service_env(postgres, redis_server, simulator), index=3)
    base = worker.metrics_url.removesuffix("/metrics")
    try:
        await asyncio.to_thread(worker.start, 30)  # localstack waits for /readyz
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/healthz", timeout=5)).status_code == 200
            assert (await http.get(f"{base}/readyz", timeout=5)).json() == {"status": "ready"}
            assert "loadproof_llm_batch_size" in (await http.get(worker.metrics_url, timeout=5)).text
            assert (await http.get(f"{base}/nope", timeout=5)).status_code == 404
            assert worker.process is not None
            worker.process.signal(signal.SIGTERM)  # stop taking work, drain, exit

            async def not_ready() -> bool:
                try:
                    return (await http.get(f"{base}/readyz", timeout=2)).status_code == 503
                except httpx.TransportError:
                    return True  # already drained and gone: not ready either

            await eventually(not_ready, within_s=10)
    finally:
        await asyncio.to_thread(worker.cleanup)
