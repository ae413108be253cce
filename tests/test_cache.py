"""The post cache against a real Redis: keys, values, TTL, and that no Redis failure ever escapes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer
from service.cache import Cache, CachedPost, NearCache, cache_key, clean_topic, decode_hit, encode_hit, normalize_topic
from service.config import Settings
from tests.conftest import make_settings, sample


def test_normalization_and_key() -> None:
    assert clean_topic("  Rust \t in\nprod  ") == "Rust in prod"
    assert normalize_topic("  RUST   in PROD ") == "rust in prod"
    assert normalize_topic("Straße") == normalize_topic("STRASSE")  # casefold, not lower
    k = cache_key("p", "Rust in prod", "v1")
    assert k == cache_key("p", "  rust IN  prod ", "v1")
    assert k != cache_key("q", "Rust in prod", "v1")
    assert k != cache_key("p", "Rust in prod", "v2")  # a new prompt version invalidates
    assert k != cache_key("p", "Rust in prods", "v1")
    assert cache_key("a\x00b", "c", "v1") != cache_key("a", "b\x00c", "v1")


def test_redis_replies_are_parsed_by_hiredis() -> None:
    """requirements.txt installs hiredis for its parser; without it redis-py silently falls back to its
    pure-Python one, which cost the API and the workers visible CPU."""
    from redis._parsers import _AsyncHiredisParser
    from redis.asyncio.connection import DefaultParser

    assert DefaultParser is _AsyncHiredisParser


def test_value_round_trip() -> None:
    raw = encode_hit("id-1", 'He said "hi" | ok', 42)
    hit = decode_hit(raw)
    assert hit is not None and hit.output_tokens == 42
    assert hit.post() == 'He said "hi" | ok' and hit.task_id() == "id-1"
    assert decode_hit(b"garbage") is None
    assert decode_hit(b"x|{}") is None


@pytest.mark.usefixtures("clean_state")
async def test_set_get_ttl_and_metrics(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    settings = make_settings(postgres, redis_server, simulator, cache_ttl_s=120)
    cache = Cache(settings)
    try:
        key = cache.key("p", "Topic")
        misses = sample("loadproof_cache_lookups_total", {"result": "miss"})
        assert await cache.get(key) is None
        assert sample("loadproof_cache_lookups_total", {"result": "miss"}) == misses + 1
        assert await cache.set_many([(key, encode_hit("t1", "a post", 7))])
        hit = await cache.get(cache.key("p", " topic "))
        assert hit is not None and hit.post() == "a post" and hit.output_tokens == 7
        ttl = redis.Redis.from_url(redis_server.url).ttl(key)
        assert 0 < ttl <= 120
        redis.Redis.from_url(redis_server.url).set(key, b"not a cached value")
        assert await cache.get(key) is None  # malformed value is a miss, not an error
    finally:
        await cache.aclose()


@pytest.mark.usefixtures("clean_state")
async def test_disabled_cache_never_touches_redis(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    cache = Cache(make_settings(postgres, redis_server, simulator, cache_enabled=False))
    try:
        key = cache.key("p", "t")
        redis.Redis.from_url(redis_server.url).set(key, encode_hit("t", "p", 1))
        lookups = sample("loadproof_cache_lookups_total", {"result": "miss"}) + sample(
            "loadproof_cache_lookups_total", {"result": "hit"}
        )
        assert await cache.get(key) is None
        assert not await cache.set_many([(key, encode_hit("t", "p", 1))])
        assert (
            sample("loadproof_cache_lookups_total", {"result": "miss"})
            + sample("loadproof_cache_lookups_total", {"result": "hit"})
            == lookups
        )
    finally:
        await cache.aclose()


async def test_dead_redis_is_a_fast_miss_and_opens_the_breaker(
    postgres: PostgresServer, simulator: SimulatorServer
) -> None:
    own = RedisServer()
    own.start()
    settings = make_settings(postgres, own, simulator, cache_breaker_failures=3, cache_breaker_reset_s=0.5)
    cache = Cache(settings)
    try:
        key = cache.key("p", "t")
        assert await cache.set_many([(key, encode_hit("t", "post", 3))])
        assert await cache.get(key) is not None
        own.stop()
        errors = sample("loadproof_cache_errors_total", {"op": "get"})
        for _ in range(5):
            assert await cache.get(key) is None
        assert not await cache.set_many([(key, encode_hit("t", "post", 3))])
        # 3 real failures opened the breaker; later calls skip Redis entirely.
        assert sample("loadproof_cache_errors_total", {"op": "get"}) == errors + 3
        assert sample("loadproof_cache_breaker_open") == 1
        own.start()  # same port, empty (no persistence)
        await asyncio.sleep(0.6)  # past cache_breaker_reset_s: the next call is the half-open probe
        assert await cache.get(key) is None  # probe succeeds (a plain miss): breaker closes
        assert sample("loadproof_cache_breaker_open") == 0
        assert await cache.set_many([(key, encode_hit("t", "post", 3))])
        assert await cache.get(key) is not None
    finally:
        await cache.aclose()
        own.cleanup()


def _mget_calls(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


@pytest.mark.usefixtures("clean_state")
@pytest.mark.parametrize("batching", [True, False])
async def test_lookups_in_one_loop_turn_share_one_mget(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, batching: bool
) -> None:
    settings = make_settings(postgres, redis_server, simulator, cache_lookup_batching=batching)
    cache = Cache(settings)
    try:
        keys = [cache.key("p", f"topic {i}") for i in range(20)]
        assert await cache.set_many([(k, encode_hit(f"t{i}", f"post {i}", i)) for i, k in enumerate(keys) if i % 2])
        redis.Redis.from_url(redis_server.url).set(keys[0].replace("post:", "inflight:"), b"task-0")
        before = _mget_calls(redis_server.url)
        results = await asyncio.gather(*(cache.lookup(k, coalesce=True) for k in keys))
        assert _mget_calls(redis_server.url) - before == (1 if batching else len(keys))
        for i, (hit, joined) in enumerate(results):  # every caller gets its own keys' values back
            assert (hit is not None) == bool(i % 2)
            assert hit is None or hit.post() == f"post {i}"
            assert joined == ("task-0" if i == 0 else None)
    finally:
        await cache.aclose()


@contextlib.asynccontextmanager
async def _posts_in_redis(settings: Settings, n: int) -> AsyncIterator[tuple[Cache, redis.Redis, list[str]]]:
    """A cache holding ``n`` posts, and a separate client to pause Redis with."""
    cache = Cache(settings)
    admin = redis.Redis.from_url(settings.redis_url)
    try:
        keys = [cache.key("p", f"topic {i}") for i in range(n)]
        assert await cache.set_many([(k, encode_hit(f"t{i}", f"post {i}", i)) for i, k in enumerate(keys)])
        yield cache, admin, keys
    finally:
        await cache.aclose()
        admin.close()


@pytest.mark.usefixtures("clean_state")
async def test_lookups_made_while_an_mget_is_out_go_together_after_it(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """Self-clocked: one MGET in flight; lookups from later loop turns wait for it and share the next."""
    settings = make_settings(postgres, redis_server, simulator, redis_socket_timeout_s=5.0)
    async with _posts_in_redis(settings, 4) as (cache, admin, keys):
        before = _mget_calls(redis_server.url)
        admin.client_pause(300, all=True)  # the first MGET stays out while the others are made
        first = asyncio.ensure_future(cache.lookup(keys[0], coalesce=False))
        later = []
        for k in keys[1:]:
            await asyncio.sleep(0.02)  # each in a loop turn of its own
            later.append(asyncio.ensure_future(cache.lookup(k, coalesce=False)))
        results = await asyncio.gather(first, *later)
        assert [hit.post() if hit else None for hit, _ in results] == [f"post {i}" for i in range(4)]
        assert _mget_calls(redis_server.url) - before == 2  # the first alone, then the three together


@pytest.mark.usefixtures("clean_state")
async def test_lookups_queued_behind_a_failed_mget_fail_with_it(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """A stalled Redis costs the lookups waiting behind a timed-out MGET one timeout, not two: they are
    misses with it, without a round trip of their own."""
    settings = make_settings(postgres, redis_server, simulator, redis_socket_timeout_s=0.2, cache_breaker_failures=100)
    async with _posts_in_redis(settings, 3) as (cache, admin, keys):
        sent: list[list[str]] = []
        real_mget = cache.client.mget

        async def counted_mget(batch: list[str]) -> Any:
            sent.append(list(batch))
            return await real_mget(batch)

        cache.client.mget = counted_mget  # type: ignore[method-assign]
        admin.client_pause(600, all=True)
        first = asyncio.ensure_future(cache.lookup(keys[0], coalesce=False))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(cache.lookup(k, coalesce=False)) for k in keys[1:]]
        assert await asyncio.gather(first, *queued) == [(None, None)] * 3  # misses, never errors
        assert sent == [[keys[0]]]  # the queued two never went out
        await asyncio.sleep(0.7)  # the pause ends
        assert (await cache.lookup(keys[1], coalesce=False))[0] is not None  # and the batcher goes on
        assert sent[1:] == [[keys[1]]]


@pytest.mark.usefixtures("clean_state")
async def test_failed_batched_lookup_is_a_miss_for_every_caller(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    from localstack.process import free_port

    settings = make_settings(postgres, redis_server, simulator, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    cache = Cache(settings)
    try:
        misses = sample("loadproof_cache_lookups_total", {"result": "miss"})
        results = await asyncio.gather(*(cache.lookup(cache.key("p", f"t{i}"), coalesce=True) for i in range(5)))
        assert results == [(None, None)] * 5
        assert sample("loadproof_cache_lookups_total", {"result": "miss"}) == misses + 5
    finally:
        await cache.aclose()


def test_near_cache_expires_keeps_stale_entries_and_drops_the_oldest_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("service.cache.time.monotonic", lambda: now[0])
    near = NearCache(ttl_s=5.0, max_entries=2)
    posts = {k: CachedPost(k.encode(), 1) for k in "abc"}
    near.put("a", posts["a"])
    near.put("b", posts["b"])
    near.put("a", posts["a"])  # refreshed: now the newest
    near.put("c", posts["c"])  # full: the oldest ("b") goes
    assert (near.get("a"), near.get("b"), near.get("c")) == (posts["a"], None, posts["c"])
    now[0] += 5.01
    assert near.get("a") is None  # expired: not fresh any more
    assert near.get("a", stale_ok=True) == posts["a"]  # but still there for when Redis cannot answer


@pytest.mark.usefixtures("clean_state")
@pytest.mark.parametrize("local_ttl_s", [30.0, 0.0])
async def test_a_post_read_from_redis_is_then_served_from_memory(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, local_ttl_s: float
) -> None:
    """A near-cache hit needs no Redis at all (the post deleted, then Redis unreachable); with a TTL
    of 0 every lookup goes to Redis."""
    cache = Cache(make_settings(postgres, redis_server, simulator, cache_local_ttl_s=local_ttl_s))
    try:
        key = cache.key("p", "near")
        assert await cache.set_many([(key, encode_hit("t1", "a post", 7))])
        assert (await cache.lookup(key, coalesce=True))[0] is not None  # from Redis
        redis.Redis.from_url(redis_server.url).delete(key)
        hits, local = (
            sample("loadproof_cache_lookups_total", {"result": "hit"}),
            sample("loadproof_cache_local_hits_total"),
        )
        before = _mget_calls(redis_server.url)
        hit, joined = await cache.lookup(key, coalesce=True)
        if local_ttl_s:
            assert hit is not None and hit.post() == "a post" and joined is None
            assert _mget_calls(redis_server.url) == before
            assert sample("loadproof_cache_local_hits_total") == local + 1
            assert sample("loadproof_cache_lookups_total", {"result": "hit"}) == hits + 1
            unreachable = _unreachable(cache, postgres, redis_server, simulator)
            assert (await unreachable.lookup(key, coalesce=True))[0] is not None
            await unreachable.aclose()
        else:
            assert hit is None and _mget_calls(redis_server.url) == before + 1
    finally:
        await cache.aclose()


@pytest.mark.usefixtures("clean_state")
async def test_while_redis_is_unavailable_an_expired_post_in_memory_is_served(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    """Stale-if-error: past its TTL a post in memory is not served while Redis answers (a deleted post is
    a miss), but is served when Redis cannot answer, with the breaker closed or open."""
    cache = Cache(make_settings(postgres, redis_server, simulator, cache_local_ttl_s=0.05, cache_breaker_failures=2))
    try:
        key, other = cache.key("p", "stale"), cache.key("p", "never cached")
        assert await cache.set_many([(key, encode_hit("t1", "a post", 7))])
        assert (await cache.lookup(key, coalesce=False))[0] is not None  # from Redis, now in memory
        redis.Redis.from_url(redis_server.url).delete(key)
        await asyncio.sleep(0.1)
        assert (await cache.lookup(key, coalesce=False))[0] is None  # expired, and Redis says it is gone
        assert await cache.set_many([(key, encode_hit("t1", "a post", 7))])
        assert (await cache.lookup(key, coalesce=False))[0] is not None
        await asyncio.sleep(0.1)
        unreachable = _unreachable(cache, postgres, redis_server, simulator, cache_breaker_failures=2)
        stale = sample("loadproof_cache_stale_hits_total")
        for _ in range(3):  # failures, then the breaker open: served from memory either way
            hit, _ = await unreachable.lookup(key, coalesce=True)
            assert hit is not None and hit.post() == "a post"
        assert not unreachable.breaker.allow()
        assert sample("loadproof_cache_stale_hits_total") == stale + 3
        assert (await unreachable.lookup(other, coalesce=True)) == (None, None)  # nothing held: a miss
        await unreachable.aclose()
    finally:
        await cache.aclose()


def _unreachable(cache: Cache, *servers: Any, **overrides: Any) -> Cache:
    """A cache with the same memory (near cache) as ``cache`` whose Redis cannot be reached."""
    from localstack.process import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    other = Cache(
        make_settings(*servers, redis_url=url, **{"cache_local_ttl_s": cache.settings.cache_local_ttl_s, **overrides})
    )
    other.near = cache.near
    return other
