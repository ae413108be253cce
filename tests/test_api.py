"""The API in-process (real app, lifespan, Postgres, Redis, simulator): task flow, coalescing,
idempotency, validation, limits. Process-level behaviour is in ``test_service_process.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer
from tests.conftest import api_client, eventually, make_settings, running_worker, sample, wait_done

pytestmark = pytest.mark.usefixtures("clean_state")


def _count_rows(pg: PostgresServer) -> int:
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM tasks").fetchone()
        return int(row[0]) if row else 0


async def test_miss_is_queued_then_done_then_served_from_cache(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator)
    async with api_client(settings) as client, running_worker(settings):
        r = await client.post("/task", json={"persona_id": "tech-optimist", "topic": "  Rust   in production "})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "queued"
        task = await wait_done(client, body["task_id"])
        assert task["status"] == "done" and task["post"]
        assert task["topic"] == "Rust in production"  # trimmed, whitespace collapsed, case kept
        assert task["attempts"] == 1 and task["error"] is None
        assert task["usage"]["output_tokens"] > 0 and task["usage"]["cost_usd"] > 0
        assert task["timings"]["started_at"] and task["timings"]["finished_at"]
        assert task["timings"]["completion_s"] >= 0

        # Same persona, topic differing only in case and whitespace: served from the cache (the worker
        # writes Postgres first, then the cache, so the hit can trail the "done" by a moment).
        async def cached() -> httpx.Response | None:
            r = await client.post("/task", json={"persona_id": "tech-optimist", "topic": "rust IN\tproduction"})
            return r if r.status_code == 200 else None

        hit = await eventually(cached, within_s=5)
        assert hit.json() == {"status": "done", "task_id": body["task_id"], "post": task["post"], "cached": True}
        hits_before = sample("loadproof_cache_lookups_total", {"result": "hit"})
        delivered_before = sample("loadproof_tokens_delivered_total", {"source": "cache"})
        again = await client.post("/task", json={"persona_id": "tech-optimist", "topic": "Rust in production"})
        assert again.status_code == 200 and again.json() == hit.json()
        assert sample("loadproof_cache_lookups_total", {"result": "hit"}) == hits_before + 1
        assert sample("loadproof_tokens_delivered_total", {"source": "cache"}) == (
            delivered_before + task["usage"]["output_tokens"]
        )
        # A different persona is a different post.
        other = await client.post("/task", json={"persona_id": "skeptic", "topic": "rust in production"})
        assert other.status_code == 202
    assert simulator.stats()["items"] == 2


async def test_concurrent_identical_requests_join_one_task(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator)
    async with api_client(settings) as client:
        before = sample("loadproof_tasks_total", {"event": "coalesced"})
        responses = await asyncio.gather(
            *(client.post("/task", json={"persona_id": "p", "topic": f"Same Topic{' ' * (i % 3)}"}) for i in range(12))
        )
        assert {r.status_code for r in responses} == {202}
        ids = {r.json()["task_id"] for r in responses}
        assert len(ids) == 1
        assert _count_rows(postgres) == 1
        assert sample("loadproof_tasks_total", {"event": "coalesced"}) == before + 11
        async with running_worker(settings):
            done = await wait_done(client, ids.pop())
        assert done["status"] == "done"
    stats = simulator.stats()
    assert stats["items"] == 1 and stats["calls"] == 1


async def test_baseline_switches_disable_coalescing_and_cache(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, coalesce_enabled=False, cache_enabled=False)
    async with api_client(settings) as client:
        a = await client.post("/task", json={"persona_id": "p", "topic": "t"})
        b = await client.post("/task", json={"persona_id": "p", "topic": "t"})
        assert a.status_code == b.status_code == 202
        assert a.json()["task_id"] != b.json()["task_id"]
        async with running_worker(settings):
            await wait_done(client, a.json()["task_id"])
            await wait_done(client, b.json()["task_id"])
        c = await client.post("/task", json={"persona_id": "p", "topic": "t"})
        assert c.status_code == 202  # no cache: a finished post is not reused


async def test_idempotency_key_maps_to_one_task(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, coalesce_enabled=False)
    async with api_client(settings) as client:
        headers = {"Idempotency-Key": "order-42"}
        a = await client.post("/task", json={"persona_id": "p", "topic": "t"}, headers=headers)
        b = await client.post("/task", json={"persona_id": "p", "topic": "T "}, headers=headers)
        assert a.status_code == b.status_code == 202
        assert a.json()["task_id"] == b.json()["task_id"]
        conflict = await client.post("/task", json={"persona_id": "p", "topic": "other"}, headers=headers)
        assert conflict.status_code == 409
        assert "Idempotency-Key" in conflict.json()["detail"]
        async with running_worker(settings):
            done = await wait_done(client, a.json()["task_id"])
        replay = await client.post("/task", json={"persona_id": "p", "topic": "t"}, headers=headers)
        assert replay.status_code == 200
        assert replay.json() == {"status": "done", "task_id": done["task_id"], "post": done["post"], "cached": False}
        # A keyed request answered from the cache still gets a durable task with that key.
        cached = await client.post("/task", json={"persona_id": "p", "topic": "t"}, headers={"Idempotency-Key": "k2"})
        again = await client.post("/task", json={"persona_id": "p", "topic": "t"}, headers={"Idempotency-Key": "k2"})
        assert cached.status_code == again.status_code == 200
        assert cached.json()["cached"] is True
        assert cached.json()["task_id"] == again.json()["task_id"] != done["task_id"]
        stored = (await client.get(f"/task/{cached.json()['task_id']}")).json()
        assert stored["status"] == "done" and stored["cached"] is True and stored["usage"]["cost_usd"] == 0


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"persona_id": "Bad Persona", "topic": "t"}, "persona_id", "pattern"),
        ({"persona_id": "x" * 65, "topic": "t"}, "persona_id", "pattern"),
        ({"persona_id": "", "topic": "t"}, "persona_id", "pattern"),
        ({"persona_id": 7, "topic": "t"}, "persona_id", "string"),
        ({"persona_id": "p", "topic": "   "}, "topic", "at least 1"),
        ({"persona_id": "p", "topic": "x" * 501}, "topic", "at most 500"),
        ({"persona_id": "p"}, "topic", "required"),
        ({"topic": "t"}, "persona_id", "required"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    postgres: PostgresServer,
    redis_server: RedisServer,
    simulator: SimulatorServer,
    body: dict[str, object],
    field: str,
    fragment: str,
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        r = await client.post("/task", json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][-1] == field and fragment in e["msg"].lower() for e in errors), errors
    assert _count_rows(postgres) == 0


async def test_topic_of_exactly_500_characters_after_trimming_is_accepted(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        r = await client.post("/task", json={"persona_id": "p", "topic": "  " + "x" * 500 + "  "})
    assert r.status_code == 202


async def test_malformed_json_and_ids_are_4xx_not_500(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        r = await client.post("/task", content=b'{"persona_id": "p", ', headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
        r = await client.post("/task", content=b"[1, 2]", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = await client.get("/task/not-a-uuid")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "task_id"]
        r = await client.get("/task/00000000-0000-4000-8000-000000000000")
        assert r.status_code == 404 and "not found" in r.json()["detail"]
        r = await client.post("/task", json={"persona_id": "p", "topic": "t"}, headers={"Idempotency-Key": "k" * 201})
        assert r.status_code == 422
        r = await client.get("/nope")
        assert r.status_code == 404


async def test_body_over_limit_is_413_with_and_without_content_length(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, max_body_bytes=1024)
    big = b'{"persona_id": "p", "topic": "' + b"x" * 2000 + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    async with api_client(settings) as client:
        before = sample("loadproof_http_rejected_total", {"reason": "too_large"})
        r = await client.post("/task", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "1024" in r.json()["detail"]
        r = await client.post("/task", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
        assert sample("loadproof_http_rejected_total", {"reason": "too_large"}) == before + 2
        small = b'{"persona_id": "p", "topic": "fits"}'

        async def small_chunks() -> AsyncIterator[bytes]:
            yield small[:10]
            yield small[10:]

        r = await client.post("/task", content=small_chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 202, r.text  # a streamed body within the limit is replayed intact
    assert _count_rows(postgres) == 1


async def test_overload_is_503_with_retry_after(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, max_inflight=1)
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"persona_id": "p", '
        await release.wait()
        yield b'"topic": "slow"}'

    async with api_client(settings) as client:
        before = sample("loadproof_http_rejected_total", {"reason": "overload"})
        labels = {"route": "/task", "method": "POST", "status": "503"}
        shed_before = sample("loadproof_http_requests_total", labels)
        slow = asyncio.create_task(
            client.post("/task", content=slow_body(), headers={"content-type": "application/json"})
        )
        await asyncio.sleep(0.2)  # the slow request is now in flight, holding the only slot
        r = await client.post("/task", json={"persona_id": "p", "topic": "fast"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert (await client.get("/healthz")).status_code == 200  # probes are never shed
        release.set()
        assert (await slow).status_code == 202
        assert sample("loadproof_http_rejected_total", {"reason": "overload"}) == before + 1
        assert sample("loadproof_http_requests_total", labels) == shed_before + 1
        r = await client.post("/task", json={"persona_id": "p", "topic": "fast"})
        assert r.status_code == 202


async def test_openapi_documents_every_status(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        doc = (await client.get("/openapi.json")).json()
    post = doc["paths"]["/task"]["post"]
    assert {"200", "202", "409", "413", "422", "503"} <= set(post["responses"])
    assert post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/TaskAccepted")
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/TaskDone")
    get = doc["paths"]["/task/{task_id}"]["get"]
    assert {"200", "404", "422"} <= set(get["responses"])
    assert "Idempotency-Key" in {p["name"].title() for p in post["parameters"]} or any(
        p["name"].lower() == "idempotency-key" for p in post["parameters"]
    )
    assert set(doc["paths"]) >= {"/task", "/task/{task_id}", "/healthz", "/readyz", "/metrics"}


async def test_readyz_and_healthz(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["checks"] == {"postgres": "ok", "redis": "ok"}
        from service.api import begin_drain

        begin_drain()
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["draining"] == "true"
        assert (await client.get("/healthz")).status_code == 200


async def test_postgres_down_is_503_not_500(redis_server: RedisServer, simulator: SimulatorServer) -> None:
    """A dead task store answers 503 + Retry-After (never 500), and readiness says so."""
    pg = PostgresServer()
    pg.start()
    try:
        settings = make_settings(pg, redis_server, simulator, db_pool_timeout_s=1.0)
        async with api_client(settings) as client:
            pg.stop()
            r = await client.post("/task", json={"persona_id": "p", "topic": "db down"})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/task/00000000-0000-4000-8000-000000000000")).status_code == 503
    finally:
        pg.cleanup()


async def test_unknown_route_is_labelled_other(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        before = sample("loadproof_http_requests_total", {"route": "other", "method": "GET", "status": "404"})
        await client.get("/some/random/path/123")
        after = sample("loadproof_http_requests_total", {"route": "other", "method": "GET", "status": "404"})
    assert after == before + 1
    assert (
        sample("loadproof_http_requests_total", {"route": "/some/random/path/123", "method": "GET", "status": "404"})
        == 0
    )


async def test_identical_request_in_flight_is_answered_without_postgres(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis as sync_redis

    from service.cache import cache_key, inflight_key
    from service.db import Database

    calls = 0

    def counted(original: Any) -> Any:
        async def counting(self: Database, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await original(self, *args, **kwargs)

        return counting

    # a new task reaches Postgres through one of two inserts: grouped (default) or per request
    monkeypatch.setattr(Database, "insert_task", counted(Database.insert_task))
    monkeypatch.setattr(Database, "insert_tasks", counted(Database.insert_tasks))
    settings = make_settings(postgres, redis_server, simulator)
    mark = inflight_key(cache_key("p", "hot topic", settings.prompt_version))
    r = sync_redis.Redis.from_url(redis_server.url)
    async with api_client(settings) as client:
        first = await client.post("/task", json={"persona_id": "p", "topic": "hot topic"})
        assert first.status_code == 202 and calls == 1
        assert r.get(mark) == first.json()["task_id"].encode()
        for _ in range(5):
            again = await client.post("/task", json={"persona_id": "p", "topic": "HOT topic "})
            assert again.status_code == 202 and again.json()["task_id"] == first.json()["task_id"]
        assert calls == 1  # joined through Redis alone
        r.delete(mark)  # Redis forgot (TTL, restart): Postgres' unique index still coalesces, and re-marks
        again = await client.post("/task", json={"persona_id": "p", "topic": "hot topic"})
        # the grouped INSERT skips the conflicting row, and the group's lookup finds the task to join
        assert again.json()["task_id"] == first.json()["task_id"] and calls == 2
        assert r.get(mark) == first.json()["task_id"].encode()
        async with running_worker(settings):
            await wait_done(client, first.json()["task_id"])
        assert r.get(mark) is None  # cleared on completion
        done = await client.post("/task", json={"persona_id": "p", "topic": "hot topic"})
        assert done.status_code == 200 and done.json()["cached"] is True
    r.close()


async def test_contention_is_503_on_both_paths(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.db import Database, TaskStoreBusy

    async def busy(self: Database, *args: Any, **kwargs: Any) -> Any:
        raise TaskStoreBusy("lost every race")

    monkeypatch.setattr(Database, "insert_task", busy)
    monkeypatch.setattr(Database, "insert_tasks", busy)
    async with api_client(make_settings(postgres, redis_server, simulator)) as client:
        fast = await client.post("/task", json={"persona_id": "p", "topic": "contended"})
        routed = await client.post(
            "/task", json={"persona_id": "p", "topic": "contended"}, headers={"Idempotency-Key": "c1"}
        )
    for r in (fast, routed):
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json() == {"detail": "task store unavailable; retry shortly"}
