"""The bare reference endpoints of ``make bench``, each a real ``python -m service.reference`` process (as
bench's ``ReferenceServer`` starts it) against the session's real Postgres and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import redis

from loadtest.bench import ReferenceServer
from localstack.servers import PostgresServer, RedisServer
from service.reference import CONSTANT_BODY, REFERENCE_STREAM

REQUESTS = 40


@pytest.fixture
def fresh(postgres: PostgresServer, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """No reference table (the app creates it) and no reference stream; a Redis client for the checks."""
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS reference_tasks")
    client = redis.Redis.from_url(redis_server.url)
    client.delete(REFERENCE_STREAM)
    try:
        yield client
    finally:
        client.close()


async def post_at_once(url: str, n: int = REQUESTS) -> list[httpx.Response]:
    """``n`` POST /task at the same time, each on its own connection opened beforehand (a warm-up GET),
    so the requests reach the server within a few milliseconds of each other."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        await asyncio.gather(*(client.get("/healthz") for _ in range(n)))
        return await asyncio.gather(
            *(client.post("/task", json={"persona_id": "p", "topic": f"t{i}"}) for i in range(n))
        )


def test_constant_answers_202_without_touching_redis(redis_server: RedisServer, fresh: redis.Redis) -> None:
    connections = int(fresh.info("stats")["total_connections_received"])
    with ReferenceServer(1, mode="constant", redis_url=redis_server.url) as ref:
        assert ref.redis is None and ref.postgres is None  # it needs neither, so bench starts neither
        answers = asyncio.run(post_at_once(ref.url))
    assert [(a.status_code, a.content) for a in answers] == [(202, CONSTANT_BODY)] * REQUESTS
    assert int(fresh.info("stats")["total_connections_received"]) == connections  # not one connection


def test_group_commits_every_row_and_stream_entry_and_concurrent_requests_share_a_commit(
    postgres: PostgresServer, redis_server: RedisServer, fresh: redis.Redis
) -> None:
    """Durable like ``insert`` (a 202 is a committed row plus an XADD), amortised: concurrent requests
    go in fewer transactions than requests. Rows of one transaction share its ``now()`` (accepted_at)."""
    with ReferenceServer(
        1, mode="group", db_pool_size=2, linger_ms=20, redis_url=redis_server.url, database_url=postgres.dsn
    ) as ref:
        answers = asyncio.run(post_at_once(ref.url))
    assert [a.status_code for a in answers] == [202] * REQUESTS
    ids = {a.json()["task_id"] for a in answers}
    assert len(ids) == REQUESTS
    with psycopg.connect(postgres.dsn) as conn:
        rows = conn.execute("SELECT id::text, accepted_at FROM reference_tasks").fetchall()
    assert {task_id for task_id, _ in rows} == ids
    commits = len({accepted_at for _, accepted_at in rows})
    assert commits < REQUESTS / 2, f"{REQUESTS} concurrent requests took {commits} transactions"
    entries = fresh.xrange(REFERENCE_STREAM)
    assert {fields[b"task_id"].decode() for _, fields in entries} == ids and len(entries) == REQUESTS


def test_a_failed_group_commit_answers_every_request_of_the_group_503(
    postgres: PostgresServer, redis_server: RedisServer, fresh: redis.Redis
) -> None:
    with ReferenceServer(
        1, mode="group", db_pool_size=2, linger_ms=20, redis_url=redis_server.url, database_url=postgres.dsn
    ) as ref:
        assert httpx.post(f"{ref.url}/task", json={}).status_code == 202
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE reference_tasks")
        answers = asyncio.run(post_at_once(ref.url))
    assert [a.status_code for a in answers] == [503] * REQUESTS
    assert fresh.xlen(REFERENCE_STREAM) == 1  # only the request made before the table went
