"""The bare reference endpoints of ``make bench``, each a real ``python -m service.reference`` process (as
bench's ``ReferenceServer`` starts it) against the session's real Postgres and Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import cast

import h11
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


async def post_at_once(url: str, n: int = REQUESTS) -> list[tuple[int, bytes]]:
    """``n`` POST /task at the same time: ``n`` connections are opened first, then every request is
    written in one go (no awaiting in between), so all reach the server within about a millisecond
    however slow the client is. Each answer as (status, body), parsed by h11."""
    host, port = url.removeprefix("http://").split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(n)]
    for i, (_, writer) in enumerate(conns):
        body = json.dumps({"persona_id": "p", "topic": f"t{i}"}).encode()
        head = f"POST /task HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    answers = []
    for reader, writer in conns:
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="POST", target="/task", headers=[("Host", host), ("Content-Length", "0")]))
        parser.send(h11.EndOfMessage())  # the parser now expects the response (the bytes were sent above)
        parser.receive_data(await asyncio.wait_for(reader.read(), 10))
        writer.close()
        status, body = 0, b""
        while not isinstance(event := parser.next_event(), h11.EndOfMessage | h11.NEED_DATA):
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
        answers.append((status, body))
    return answers


def test_constant_answers_202_without_touching_redis(redis_server: RedisServer, fresh: redis.Redis) -> None:
    connections = int(fresh.info("stats")["total_connections_received"])
    with ReferenceServer(1, mode="constant", redis_url=redis_server.url) as ref:
        assert ref.redis is None and ref.postgres is None  # it needs neither, so bench starts neither
        answers = asyncio.run(post_at_once(ref.url))
    assert answers == [(202, CONSTANT_BODY)] * REQUESTS
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
    assert [status for status, _ in answers] == [202] * REQUESTS
    ids = {json.loads(body)["task_id"] for _, body in answers}
    assert len(ids) == REQUESTS
    with psycopg.connect(postgres.dsn) as conn:
        rows = conn.execute("SELECT id::text, accepted_at FROM reference_tasks").fetchall()
    assert {task_id for task_id, _ in rows} == ids
    commits = len({accepted_at for _, accepted_at in rows})
    assert commits <= REQUESTS // 4, f"{REQUESTS} concurrent requests took {commits} transactions"
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], fresh.xrange(REFERENCE_STREAM))
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
    assert [status for status, _ in answers] == [503] * REQUESTS
    assert fresh.xlen(REFERENCE_STREAM) == 1  # only the request made before the table went
