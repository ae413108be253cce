"""Group commit of new tasks: one INSERT and one XADD script call per group, and still no 202 without a row.

Real Postgres and Redis. A failed commit is a real one: a trigger makes Postgres reject the group's
INSERT, so every request that waited on that group must get an error, and none a 202.
"""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer
from service.accept import Accepted, GroupCommitter, NewTask
from service.cache import make_redis
from service.db import Database
from service.queue import TaskQueue, sweep
from tests.conftest import api_client, make_settings, running_worker, sample, wait_done

pytestmark = pytest.mark.usefixtures("clean_state")

LINGER = {"accept_linger_ms": 50.0}  # wide enough that a gather() of requests lands in one group


def rows(pg: PostgresServer, topic_like: str) -> int:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        found = conn.execute("SELECT count(*) FROM tasks WHERE topic LIKE %s", (topic_like,)).fetchone()
        return int(found[0]) if found else 0


async def test_concurrent_new_tasks_share_one_commit_and_are_all_done(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, **LINGER)
    groups_before = sample("loadproof_accept_group_size_count")
    async with api_client(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/task", json={"persona_id": "p", "topic": f"grouped {i}"}) for i in range(20))
        )
        assert [a.status_code for a in answers] == [202] * 20
        assert sample("loadproof_accept_group_size_count") - groups_before <= 2  # ~one group, not 20
        assert rows(postgres, "grouped %") == 20
        async with running_worker(settings):
            for a in answers:
                assert (await wait_done(client, a.json()["task_id"], within_s=30))["status"] == "done"


async def test_a_failed_group_commit_answers_every_waiting_request_with_an_error(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, **LINGER)
    async with api_client(settings) as client:
        # a serialization failure (SQLSTATE 40001): the transient kind a real commit can hit
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE OR REPLACE FUNCTION reject_poison() RETURNS trigger AS $$ BEGIN "
                "IF NEW.topic LIKE 'poison%' THEN RAISE EXCEPTION 'commit failed (test)' USING ERRCODE = '40001'; "
                "END IF; RETURN NEW; END "
                "$$ LANGUAGE plpgsql"
            )
            conn.execute(
                "CREATE TRIGGER reject_poison BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION reject_poison()"
            )
        try:
            # one poisoned row fails the whole group's INSERT: its neighbours were never committed either
            topics = [f"victim {i}" for i in range(9)] + ["poison"]
            answers = await asyncio.gather(
                *(client.post("/task", json={"persona_id": "p", "topic": t}) for t in topics)
            )
        finally:
            with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                conn.execute("DROP TRIGGER reject_poison ON tasks")
        assert [a.status_code for a in answers] == [503] * 10, [a.text for a in answers]
        assert all(a.headers.get("retry-after") == "1" for a in answers)
        assert rows(postgres, "victim %") == 0 and rows(postgres, "poison%") == 0  # no 202, and no row


async def test_a_crash_between_commit_and_xadd_is_healed_by_the_sweeper(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(postgres, redis_server, simulator, queue_sweep_grace_s=0.3, **LINGER)

    async def crashed(self: TaskQueue, items: list[tuple[str, str | None]], inflight_ttl_s: int = 60) -> bool:
        return False  # committed, then the process "died" before its XADD

    monkeypatch.setattr(TaskQueue, "enqueue_group", crashed)
    async with api_client(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/task", json={"persona_id": "p", "topic": f"orphan {i}"}) for i in range(5))
        )
        ids = {a.json()["task_id"] for a in answers}
        assert [a.status_code for a in answers] == [202] * 5
    monkeypatch.undo()
    db = Database(settings)
    queue = TaskQueue(settings, make_redis(settings, socket_timeout=5.0))
    try:
        await queue.ensure_group()
        assert not ids & await queue.task_ids_in_stream()
        await asyncio.sleep(0.4)
        assert set(await sweep(queue, db)) == ids
        async with api_client(settings) as client, running_worker(settings):
            for task_id in ids:
                assert (await wait_done(client, task_id, within_s=30))["status"] == "done"
    finally:
        await queue.client.aclose()
        await db.aclose()


async def test_a_group_is_answered_at_its_commit_not_after_its_xadd(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 202 needs the committed row; the stream entry follows off the request's path, in order."""
    settings = make_settings(postgres, redis_server, simulator)
    db = Database(settings)
    queue = TaskQueue(settings, make_redis(settings, socket_timeout=5.0))
    committer = GroupCommitter(db, queue, linger_s=0.002, max_batch=100, inflight_ttl_s=60)
    release = asyncio.Event()
    original = TaskQueue.enqueue_group

    async def slow_redis(self: TaskQueue, items: list[tuple[str, str | None]], inflight_ttl_s: int = 60) -> bool:
        await release.wait()
        return await original(self, items, inflight_ttl_s)

    monkeypatch.setattr(TaskQueue, "enqueue_group", slow_redis)
    try:
        await db.create_schema()
        await queue.ensure_group()
        tasks = [NewTask(str(uuid.uuid4()), "p", f"early {i}", f"k:early {i}", None, None, None) for i in range(3)]
        accepted = await asyncio.wait_for(asyncio.gather(*(committer.submit(t) for t in tasks[:2])), 5)
        assert accepted == [Accepted(t.task_id, created=True) for t in tasks[:2]]
        assert rows(postgres, "early %") == 2 and await queue.client.xlen(queue.stream) == 0
        assert await asyncio.wait_for(committer.submit(tasks[2]), 5) == Accepted(tasks[2].task_id, created=True)
        release.set()
        await committer.enqueued()
        streamed = [f[b"task_id"].decode() for _, f in await queue.client.xrange(queue.stream)]
        assert streamed == [t.task_id for t in tasks]  # commit order, the later group batched behind
    finally:
        release.set()
        await committer.aclose()
        await queue.client.aclose()
        await db.aclose()


async def test_group_order_is_accept_order_and_conflicts_take_the_per_request_path(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator)
    db = Database(settings)
    queue = TaskQueue(settings, make_redis(settings, socket_timeout=5.0))
    committer = GroupCommitter(db, queue, linger_s=0.05, max_batch=100, inflight_ttl_s=60)
    try:
        await db.create_schema()
        await queue.ensure_group()

        def new(topic: str, *, idem: str | None = None, coalesce: bool = True) -> NewTask:
            key = f"k:{topic}"
            return NewTask(str(uuid.uuid4()), "p", topic, key, key if coalesce else None, idem, None)

        tasks = [new(f"ordered {i}") for i in range(30)]
        # same idempotency key twice and an identical in-flight task twice, all in the one group
        dup_idem = [new("idem a", idem="key-1"), new("idem b", idem="key-1")]
        dup_coalesce = [new("same topic"), new("same topic")]
        results = await asyncio.gather(*(committer.submit(t) for t in [*tasks, *dup_idem, *dup_coalesce]))
        assert results[:30] == [Accepted(t.task_id, created=True) for t in tasks]
        assert results[30:] == [
            Accepted(dup_idem[0].task_id, created=True),
            None,  # the key was used: the per-request path replays it
            Accepted(dup_coalesce[0].task_id, created=True),
            Accepted(dup_coalesce[0].task_id, created=False),  # joins its identical neighbour: one row
        ]
        assert rows(postgres, "same topic") == 1
        await committer.enqueued()  # answered at the commit; the entries follow off the request's path
        entries = await queue.client.xrange(queue.stream)
        streamed = [fields[b"task_id"].decode() for _, fields in entries]
        expected = [t.task_id for t in tasks] + [dup_idem[0].task_id, dup_coalesce[0].task_id]
        assert streamed == expected  # in accept order
        # the losers' per-request path finds the task to replay or join
        replay = await db.insert_task(dup_idem[1].task_id, "p", "idem b", "k:idem b", "k:idem b", "key-1")
        assert replay[0] == dup_idem[0].task_id and replay[1] is False
        # a later group joins the unfinished task committed by an earlier one, found by one SELECT
        later = [new("same topic"), new("same topic"), new("fresh")]
        again = await asyncio.gather(*(committer.submit(t) for t in later))
        assert again == [
            Accepted(dup_coalesce[0].task_id, created=False),
            Accepted(dup_coalesce[0].task_id, created=False),
            Accepted(later[2].task_id, created=True),
        ]
        assert rows(postgres, "same topic") == 1
        # once it is finished, an identical request makes a new task
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("UPDATE tasks SET status = 'done', post = 'x' WHERE id = %s", (dup_coalesce[0].task_id,))
        after = new("same topic")
        assert await committer.submit(after) == Accepted(after.task_id, created=True)
    finally:
        await committer.aclose()
        await queue.client.aclose()
        await db.aclose()


async def test_idempotency_keys_hold_through_the_group_path(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, **LINGER)
    async with api_client(settings) as client:
        body = {"persona_id": "p", "topic": "keyed"}
        same = await asyncio.gather(
            *(client.post("/task", json=body, headers={"Idempotency-Key": "k1"}) for _ in range(4))
        )
        assert {a.json()["task_id"] for a in same} == {same[0].json()["task_id"]}
        assert all(a.status_code == 202 for a in same)
        other = await client.post("/task", json={"persona_id": "p", "topic": "else"}, headers={"Idempotency-Key": "k1"})
        assert other.status_code == 409
    assert rows(postgres, "keyed") == 1


@pytest.mark.parametrize("max_writes", [1, 8])
async def test_arrivals_during_a_write_wait_for_it_and_go_as_one_group(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, max_writes: int
) -> None:
    """With one write in flight per process, tasks arriving while it commits form the next group
    (groups grow under load); with eight allowed, each linger window makes its own group."""
    settings = make_settings(postgres, redis_server, simulator)
    db = Database(settings)
    queue = TaskQueue(settings, make_redis(settings, socket_timeout=5.0))
    committer = GroupCommitter(db, queue, linger_s=0.002, max_batch=256, inflight_ttl_s=60, max_writes=max_writes)
    await db.create_schema()
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:  # the first group's commit takes 0.4 s
        conn.execute(
            "CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger AS $$ BEGIN "
            "IF NEW.topic = 'slow' THEN PERFORM pg_sleep(0.4); END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.execute("CREATE TRIGGER slow_commit BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION slow_commit()")
    groups = sample("loadproof_accept_group_size_count")

    def task(topic: str) -> NewTask:
        return NewTask(str(uuid.uuid4()), "p", topic, f"post:{topic}", None, None, None)

    try:
        first = asyncio.create_task(committer.submit(task("slow")))
        await asyncio.sleep(0.05)
        later = []
        for i in range(10):  # 20 ms apart: ten linger windows
            later.append(asyncio.create_task(committer.submit(task(f"meanwhile {i}"))))
            await asyncio.sleep(0.02)
        accepted = await asyncio.gather(first, *later)
        await committer.aclose()
    finally:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER slow_commit ON tasks")
        await queue.client.aclose()
        await db.aclose()
    assert all(isinstance(a, Accepted) and a.created for a in accepted)
    assert rows(postgres, "meanwhile %") == 10
    made = sample("loadproof_accept_group_size_count") - groups
    assert made == 2 if max_writes == 1 else made >= 10, made
