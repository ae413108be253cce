"""The worker (in-process, real Postgres/Redis/simulator): adaptive micro-batching, tasks finished as
their items close in the streamed reply, billing once per call, item retry, LLM faults,
dead-lettering; and a worker process SIGKILLed between read and ack."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import psycopg
import pytest

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer, WorkerProcess
from service.cache import cache_key, make_redis
from service.config import Settings
from service.cost import PriceTable
from service.db import Database
from service.llm import LLMClient, LLMItem, LLMItemResult, PostSink
from service.pressure import PressureSignal, pressure_key
from service.queue import TaskQueue
from service.worker import ArrivalRate, Worker, worth_waiting
from tests.conftest import eventually, make_settings, running_worker, sample, service_env
from tests.simproc import running_simulator

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
            "SELECT id::text, status, post, attempts, error, output_tokens, cost_usd, finished_at FROM tasks "
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


# Each post takes ~0.6 s to stream (~75 tokens x 8 ms): "done while the call still streams" is observable.
SLOW_SIM_ENV = {"LOADPROOF_SIM_TTFT_MS": "50", "LOADPROOF_SIM_ITL_MS": "8"}


@pytest.fixture(scope="module")
def slow_simulator() -> Iterator[SimulatorServer]:
    with running_simulator(SLOW_SIM_ENV) as sim:
        yield sim


class RecordingLLM(LLMClient):
    """The real client, noting each call's item ids in the order the reply writes them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.calls: list[list[str]] = []

    async def generate(self, items: Sequence[LLMItem], on_post: PostSink | None = None) -> list[LLMItemResult]:
        self.calls.append([it.id for it in items])
        return await super().generate(items, on_post)


def _priced(settings: Settings, stats: dict[str, Any]) -> float:
    """What the simulator's reported usage costs at the model's price."""
    price = PriceTable(settings.llm_prices).price(settings.llm_model)
    return price.cost_usd(stats["prompt_tokens"], stats["completion_tokens"])


def _spent(settings: Settings) -> float:
    return sample("loadproof_llm_cost_usd_total", {"model": settings.llm_model})


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


async def test_with_redis_down_the_worker_claims_queued_tasks_from_postgres(
    postgres: PostgresServer, simulator: SimulatorServer
) -> None:
    """Tasks accepted while Redis is down (row committed, XADD failed) are worked on during the
    outage, not only swept over when Redis returns; with Redis back the stream is read again."""
    with RedisServer() as own_redis:
        settings = make_settings(postgres, own_redis, simulator, batch_size=5, queue_sweep_interval_s=600)
        claimed_before = sample("loadproof_tasks_total", {"event": "claimed_direct"})
        async with running_worker(settings):
            own_redis.stop()
            db = Database(settings)
            try:
                during = []
                for i in range(12):
                    key = cache_key("persona", f"outage {i}", settings.prompt_version)
                    task_id, created, _ = await db.insert_task(
                        str(uuid.uuid4()), "persona", f"outage {i}", key, key, None
                    )
                    assert created
                    during.append(task_id)
            finally:
                await db.aclose()
            rows = await eventually(lambda: _all_final(postgres, during), within_s=30)
            assert all(r["status"] == "done" and r["post"] and r["attempts"] == 1 for r in rows.values())
            assert sample("loadproof_tasks_total", {"event": "claimed_direct"}) - claimed_before == 12
            assert simulator.stats()["items"] == 12

            own_redis.start()  # empty: the group is made again on the first read
            after = await _accept(settings, ["after the outage"])
            await eventually(lambda: _all_final(postgres, after), within_s=30)
        assert sample("loadproof_tasks_total", {"event": "claimed_direct"}) - claimed_before == 12


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


async def test_streamed_items_finish_in_the_order_they_close(
    postgres: PostgresServer, redis_server: RedisServer, slow_simulator: SimulatorServer
) -> None:
    slow_simulator.reset()
    settings = make_settings(postgres, redis_server, slow_simulator, batch_size=3)
    ids = await _accept(settings, ["first", "second", "third"])
    llm = RecordingLLM(settings)
    spent_before = _spent(settings)
    seen: dict[str, tuple[int, set[str]]] = {}  # task -> (calls in flight, tasks done) when first seen done

    async def watch() -> dict[str, dict[str, Any]] | None:
        rows = await asyncio.to_thread(_rows, postgres, ids)
        done = {i for i, r in rows.items() if r["status"] == "done"}
        inflight = (await asyncio.to_thread(slow_simulator.stats))["inflight"]  # read after the rows
        for task_id in done - seen.keys():
            seen[task_id] = (inflight, done)
        return rows if len(rows) == 3 and all(_final(r) for r in rows.values()) else None

    async with running_worker(settings, llm=llm):
        rows = await eventually(watch, interval=0.02)
    assert len(llm.calls) == 1 and sorted(llm.calls[0]) == sorted(ids), llm.calls
    order = llm.calls[0]
    finished = [rows[i]["finished_at"] for i in order]
    assert finished[0] < finished[1] < finished[2], finished  # in the order the reply closed them
    assert (finished[2] - finished[0]).total_seconds() > 0.5  # not stored together at the end of the call
    inflight, done_then = seen[order[0]]
    assert inflight == 1 and order[2] not in done_then  # the first was done while the call still streamed
    stats = slow_simulator.stats()
    assert stats["items_per_call"] == {"3": 1} and stats["streams"] == 1
    # Billed once: per-task shares add up to the cost counter and to the simulator's usage, priced.
    spent = _spent(settings) - spent_before
    assert spent > 0 and sum(r["cost_usd"] for r in rows.values()) == pytest.approx(spent)
    assert spent == pytest.approx(_priced(settings, stats))


MALFORMED_SEED = 1  # with rate 0.5, this seed breaks some but not all of the first call's 6 items


async def test_malformed_streamed_item_is_retried_alone_and_the_others_are_not_resent(
    postgres: PostgresServer, redis_server: RedisServer, slow_simulator: SimulatorServer
) -> None:
    slow_simulator.reset()
    slow_simulator.control(rate_malformed=0.5, seed=MALFORMED_SEED)
    settings = make_settings(postgres, redis_server, slow_simulator, batch_size=6)
    ids = await _accept(settings, [f"item {i}" for i in range(6)])
    llm = RecordingLLM(settings)
    spent_before = _spent(settings)
    retried_before = sample("loadproof_tasks_total", {"event": "retried"})

    async def first_call_arrived() -> bool:  # its content (and which items break) is decided on arrival
        return (await asyncio.to_thread(slow_simulator.stats))["calls"] >= 1

    async with running_worker(settings, llm=llm):
        await eventually(first_call_arrived, interval=0.01)
        slow_simulator.control(rate_malformed=0)  # the retries come back well-formed
        rows = await eventually(lambda: _all_final(postgres, ids))
    stats = slow_simulator.stats()
    broken = stats["injected"].get("malformed_items", 0)
    assert 0 < broken < 6, f"seed {MALFORMED_SEED} broke {broken} of 6 items; pick a seed that breaks some"
    assert sorted(llm.calls[0]) == sorted(ids)
    retried = {call[0] for call in llm.calls[1:]}
    assert all(len(call) == 1 for call in llm.calls[1:]) and len(llm.calls) == 1 + broken == 1 + len(retried)
    assert stats["items_per_call"] == {"6": 1, "1": broken}  # the well-formed items were not sent again
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows.values()), rows
    assert sample("loadproof_tasks_total", {"event": "retried"}) - retried_before == broken
    # The well-formed items were finished from the first stream, before any retried one.
    assert max(rows[i]["finished_at"] for i in ids if i not in retried) < min(rows[i]["finished_at"] for i in retried)
    spent = _spent(settings) - spent_before  # a retried item carries its share of both calls
    assert sum(r["cost_usd"] for r in rows.values()) == pytest.approx(spent)
    assert spent == pytest.approx(_priced(settings, stats))


async def test_lone_task_is_sent_at_once(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """With nothing queued a task does not wait for company: batch_wait_ms is a cap, not a delay."""
    settings = make_settings(postgres, redis_server, simulator, batch_size=5, batch_wait_ms=2000)
    async with running_worker(settings):
        for i in range(3):
            started = time.monotonic()
            ids = await _accept(settings, [f"lone {i}"])
            await eventually(lambda ids=ids: _all_final(postgres, ids))
            assert time.monotonic() - started < 1.5  # far below the 2 s a filling batch would wait
            await asyncio.sleep(1.0)
    assert simulator.stats()["items_per_call"] == {"1": 3}


async def test_provider_at_600_rpm_the_worker_stays_under_its_budget_and_every_task_completes(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """The whole worker (limiter included) against a provider limited to 600 requests per minute, with no
    budget configured: it learns the budget from the ``x-ratelimit-*`` headers. 660 one-item calls spend
    the full minute's bucket and then 60 more at the refill rate (10/s): under 1 % of calls get a 429
    and every task is done, none failed or lost."""
    settings = make_settings(postgres, redis_server, simulator, batch_size=1, llm_rpm=0, llm_tpm=0, llm_deadline_s=60.0)
    simulator.control(rpm=600, tpm=0, reset_stats=True)
    try:
        ids = await _accept(settings, [f"budget {i}" for i in range(660)])
        async with running_worker(settings):
            rows = await eventually(lambda: _all_final(postgres, ids), within_s=90.0, interval=0.5)
        stats = simulator.stats()
    finally:
        simulator.control(rpm=0, tpm=0)
    assert {r["status"] for r in rows.values()} == {"done"}
    assert stats["completed"] >= 660
    limited = stats["rate_limited"]["requests"]
    assert limited < 0.01 * stats["calls"], f"{limited} of {stats['calls']} calls got a 429"


def test_adaptive_batching_waits_only_while_the_rate_fills_the_batch() -> None:
    now = [0.0]
    arrivals = ArrivalRate(1.0, clock=lambda: now[0])
    assert arrivals.rate() == 0 and not worth_waiting(4, arrivals.rate(), 0.1)
    for _ in range(200):  # 20 entries/s
        now[0] += 0.05
        arrivals.add(1)
    assert arrivals.rate() == pytest.approx(20, rel=0.05)
    assert not worth_waiting(4, arrivals.rate(), 0.1)  # 4 more would take ~200 ms: go with what is there
    assert worth_waiting(1, arrivals.rate(), 0.1)  # 1 more comes within ~50 ms
    for _ in range(400):  # 200 entries/s
        now[0] += 0.005
        arrivals.add(1)
    assert worth_waiting(4, arrivals.rate(), 0.1)  # full within ~20 ms: one system prompt for 5 tasks
    now[0] += 10
    assert arrivals.rate() < 0.01  # forgets a burst once arrivals stop
    assert not worth_waiting(0, 1000.0, 0.1) and not worth_waiting(1, 1000.0, 0.0)


async def test_a_shed_makes_the_workers_hold_one_batch_until_the_signal_expires(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """The API's pressure signal (service.pressure) through a real Redis: one request shed for overload
    sets a key that expires after ``overload_signal_ttl_ms``; a worker holds ``worker_pressure_batches``
    batches while it exists and its adaptive limit again after."""
    settings = make_settings(postgres, redis_server, simulator, overload_signal_ttl_ms=400, worker_pressure_batches=1)
    client = make_redis(settings, socket_timeout=5.0)
    signal = PressureSignal(settings, client)
    worker = Worker(settings)
    try:
        usual = worker._batch_limit()
        assert usual > 1
        signal.shed()
        signal.shed()  # within SIGNAL_INTERVAL_S of the first: no second write
        await asyncio.sleep(0.05)
        assert 0 < await client.pttl(pressure_key(settings)) <= 400
        await worker._read_pressure()
        assert worker._batch_limit() == 1
        assert sample("loadproof_worker_yielding") == 1
        await asyncio.sleep(0.5)
        await worker._read_pressure()
        assert worker._batch_limit() == usual
        assert sample("loadproof_worker_yielding") == 0
    finally:
        await worker.aclose()
        await client.aclose()
