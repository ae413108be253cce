"""The durable queue: stream mechanics, reclaim, and that an accepted task is never lost (sweeper)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer
from service.cache import make_redis
from service.db import Database
from service.queue import TaskQueue, sweep
from tests.conftest import api_client, eventually, make_settings, running_worker, sample, wait_done

pytestmark = pytest.mark.usefixtures("clean_state")


async def _insert(db: Database, topic: str) -> str:
    task_id, created, _ = await db.insert_task(str(uuid.uuid4()), "p", topic, f"key:{topic}", None, None)
    assert created
    return task_id


async def test_stream_read_ack_depth_pending_and_reclaim(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, queue_claim_idle_ms=1000)
    client = make_redis(settings, socket_timeout=5.0)
    queue = TaskQueue(settings, client)
    try:
        await queue.ensure_group()
        await queue.ensure_group()  # idempotent
        for i in range(3):
            assert await queue.enqueue(f"task-{i}")
        assert await queue.depth_and_pending() == (3, 0)
        got = await queue.read("dead-consumer", 2, None)
        assert [e.task_id for e in got] == ["task-0", "task-1"]
        assert await queue.depth_and_pending() == (1, 2)
        assert await queue.task_ids_in_stream() == {"task-0", "task-1", "task-2"}
        # Not idle long enough yet: nothing to reclaim.
        assert await queue.autoclaim("live-consumer", 10) == []
        await asyncio.sleep(1.1)
        await queue.touch("dead-consumer", [got[1].entry_id])  # task-1's holder is alive after all
        reclaimed = await queue.autoclaim("live-consumer", 10)
        assert [e.task_id for e in reclaimed] == ["task-0"]
        await queue.ack([e.entry_id for e in got])
        assert await queue.task_ids_in_stream() == {"task-2"}  # acked entries are deleted
        assert await queue.depth_and_pending() == (1, 0)
        await queue.update_gauges()
        assert sample("loadproof_queue_depth") == 1 and sample("loadproof_queue_pending") == 0
    finally:
        await client.aclose()


async def test_a_group_enqueue_adds_entries_in_order_with_their_marks_even_after_a_script_flush(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """One script call per group: an entry per task in the given order, a mark (NX, with TTL) only
    where one is given; a Redis that forgot the script (restart, SCRIPT FLUSH) gets it again."""
    settings = make_settings(postgres, redis_server, simulator)
    client = make_redis(settings, socket_timeout=5.0)
    queue = TaskQueue(settings, client)
    try:
        await queue.ensure_group()
        await client.set("mark:b", "earlier")  # NX: an existing mark is kept
        items = [("a", "mark:a"), ("b", "mark:b"), ("c", None), ("d", "mark:d")]
        assert await queue.enqueue_group(items, inflight_ttl_s=30)
        entries = await client.xrange(queue.stream)
        assert [fields[b"task_id"] for _, fields in entries] == [b"a", b"b", b"c", b"d"]
        assert await client.mget(["mark:a", "mark:b", "mark:c", "mark:d"]) == [b"a", b"earlier", None, b"d"]
        assert 0 < await client.ttl("mark:a") <= 30 and await client.ttl("mark:b") == -1
        await client.script_flush()
        assert await queue.enqueue_group([("e", None)])
        assert [f[b"task_id"] for _, f in await client.xrange(queue.stream)][-1] == b"e"
        assert await queue.enqueue_group([])  # nothing to do is not a failure
    finally:
        await client.aclose()


async def test_sweeper_enqueues_committed_rows_missing_from_the_stream(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """The process died (or Redis failed) between the commit and XADD: the row alone is enough."""
    settings = make_settings(postgres, redis_server, simulator, queue_sweep_grace_s=0.3)
    db = Database(settings)
    client = make_redis(settings, socket_timeout=5.0)
    queue = TaskQueue(settings, client)
    try:
        await db.create_schema()
        await queue.ensure_group()
        lost = await _insert(db, "lost")
        present = await _insert(db, "present")
        assert await queue.enqueue(present)
        fresh_grace = await sweep(queue, db)
        assert fresh_grace == []  # younger than the grace period: XADD may still be on its way
        await asyncio.sleep(0.4)
        swept = await sweep(queue, db)
        assert swept == [lost]
        assert await queue.task_ids_in_stream() == {lost, present}
        assert await sweep(queue, db) == []  # now in the stream: no duplicate
        # A finished task is never re-enqueued.
        done = await _insert(db, "done")
        await db.claim([done])
        assert len(await db.complete([(done, "post", 1, 2, 0.1)])) == 1
        await asyncio.sleep(0.4)
        assert await sweep(queue, db) == []
    finally:
        await client.aclose()
        await db.aclose()


async def test_completion_is_idempotent(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    db = Database(make_settings(postgres, redis_server, simulator))
    try:
        await db.create_schema()
        task_id = await _insert(db, "t")
        claimed = await db.claim([task_id, str(uuid.uuid4())])
        assert [r["id"] for r in claimed] == [task_id] and claimed[0]["attempts"] == 1
        first = await db.complete([(task_id, "first", 10, 20, 0.5)])
        second = await db.complete([(task_id, "second", 99, 99, 9.9)])
        assert len(first) == 1 and second == []
        assert await db.claim([task_id]) == []  # done tasks are not claimed again
        assert not await db.fail(task_id, "late failure")  # nor dead-lettered over a stored post
        row = await db.get_task(task_id)
        assert row is not None
        assert (row["status"], row["post"], row["output_tokens"], row["cost_usd"]) == ("done", "first", 20, 0.5)
    finally:
        await db.aclose()


async def test_redis_down_still_accepts_durably_and_recovers(
    postgres: PostgresServer, simulator: SimulatorServer
) -> None:
    """Redis (cache + queue) dies: POST keeps answering 202 from Postgres; when Redis returns EMPTY,
    the sweeper re-enqueues the tasks and they complete; the cache works again."""
    own = RedisServer()  # no persistence: it comes back with no stream and no group
    own.start()
    settings = make_settings(
        postgres, own, simulator, cache_breaker_failures=2, cache_breaker_reset_s=0.5, queue_sweep_grace_s=0.5
    )
    try:
        async with api_client(settings) as client:
            own.stop()
            accepted = []
            for i in range(4):
                r = await client.post("/task", json={"persona_id": "p", "topic": f"while redis is down {i}"})
                assert r.status_code == 202, r.text
                accepted.append(r.json()["task_id"])
            again = await client.post("/task", json={"persona_id": "p", "topic": "while redis is down 0"})
            assert again.json()["task_id"] == accepted[0]  # coalescing falls back to Postgres
            with psycopg.connect(postgres.dsn) as conn:
                rows = conn.execute("SELECT count(*) FROM tasks WHERE status = 'queued'").fetchone()
            assert rows is not None and rows[0] == 4
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["redis"].startswith("degraded")

            own.start()
            swept = sample("loadproof_tasks_total", {"event": "swept"})
            async with running_worker(settings):
                for task_id in accepted:
                    assert (await wait_done(client, task_id))["status"] == "done"
            assert sample("loadproof_tasks_total", {"event": "swept"}) >= swept + 4

            async def cached() -> bool:
                r = await client.post("/task", json={"persona_id": "p", "topic": "while redis is down 1"})
                return r.status_code == 200 and r.json()["cached"] is True

            await eventually(cached, within_s=5)
    finally:
        own.cleanup()
