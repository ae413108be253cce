"""The post cache in Redis: an optimization that must never hurt a request.

Key = hash of ``persona_id``, the normalized topic (trimmed, whitespace collapsed, casefolded) and
``prompt_version``, so trivially different spellings share a post and a new prompt invalidates all.
The value is the ready-to-send JSON body of the 200 response plus the post's output tokens, so a
hit costs one GET and no JSON work: the hot path of the whole service.

Every Redis failure (down, slow past ``redis_socket_timeout_s``, pool exhausted) is a miss, counted
in ``CACHE_ERRORS``; after ``cache_breaker_failures`` in a row the breaker skips Redis for
``cache_breaker_reset_s`` so a dead Redis costs nothing per request.

A post read from Redis is also kept in the process's own memory for ``cache_local_ttl_s`` (a near
cache, bounded to ``cache_local_max_entries``): under a Zipf workload the hot posts are asked for many
times a second, and a hit from memory costs no round trip and no event-loop turn at all, where the
Redis round trip was most of a hit's CPU. Posts are immutable per key (the prompt version is part of
it), so the only staleness is a post deleted from Redis still served for up to that TTL. The near
cache also answers while Redis is unavailable, then past that TTL (stale-if-error, as HTTP caches do):
whatever it still holds is the post Redis would have served, and every hot key answered from memory
during an outage is a request that does not become a new task the workers must catch up on after.

Lookups issued in the same event-loop turn share one ``MGET`` (``cache_lookup_batching``): a Redis
round trip through redis-py costs this process more CPU than the rest of a cache hit, and requests
that arrive together (uvicorn starts every request parsed from one socket read in the same turn) pay
it once. Nothing waits for a timer: the batch is sent on the loop's next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter

from service import metrics
from service.breaker import CircuitBreaker
from service.config import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "loadproof:post:"
INFLIGHT_PREFIX = "loadproof:inflight:"
INFLIGHT_TTL_S = 60  # a hint only: Postgres' unique index is the real coalescing guard
_WS = re.compile(r"\s+")

_HIT = metrics.CACHE_LOOKUPS.labels("hit")
_HIT_LOCAL = metrics.CACHE_LOCAL_HITS
_HIT_STALE = metrics.CACHE_STALE_HITS
_MISS = metrics.CACHE_LOOKUPS.labels("miss")
_ERR_GET = metrics.CACHE_ERRORS.labels("get")
_ERR_SET = metrics.CACHE_ERRORS.labels("set")
_DELIVERED_CACHE = metrics.TOKENS_DELIVERED.labels("cache")


def clean_topic(topic: str) -> str:
    """Trimmed with inner whitespace collapsed: what is stored and sent to the LLM."""
    return _WS.sub(" ", topic).strip()


def normalize_topic(topic: str) -> str:
    """The cache/coalescing identity of a topic: ``clean_topic`` and casefolded."""
    return clean_topic(topic).casefold()


def cache_key(persona_id: str, topic: str, prompt_version: str) -> str:
    # JSON array: unambiguous whatever characters the parts contain.
    raw = json.dumps([persona_id, normalize_topic(topic), prompt_version], ensure_ascii=False).encode()
    return KEY_PREFIX + hashlib.blake2b(raw, digest_size=16).hexdigest()


def inflight_key(post_key: str) -> str:
    """Redis key holding the id of the unfinished task for a post key (coalescing fast path)."""
    return INFLIGHT_PREFIX + post_key.removeprefix(KEY_PREFIX)


def encode_hit(task_id: str, post: str, output_tokens: int) -> bytes:
    """``<output_tokens>|<200 response body>``: what a hit sends, pre-rendered."""
    body = json.dumps(
        {"status": "done", "task_id": task_id, "post": post, "cached": True}, ensure_ascii=False, separators=(",", ":")
    )
    return f"{output_tokens}|".encode() + body.encode()


@dataclass(frozen=True, slots=True)
class CachedPost:
    body: bytes  # the JSON response body
    output_tokens: int

    def post(self) -> str:
        return str(json.loads(self.body)["post"])

    def task_id(self) -> str:
        return str(json.loads(self.body)["task_id"])


def decode_hit(raw: bytes) -> CachedPost | None:
    tokens, sep, body = raw.partition(b"|")
    if not sep or not tokens.isdigit():
        return None
    return CachedPost(body, int(tokens))


def make_redis(settings: Settings, *, socket_timeout: float | None, pool_size: int | None = None) -> aioredis.Redis:
    """A client on a blocking pool (the default pool raises when exhausted instead of waiting)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=pool_size or settings.redis_pool_size,
        timeout=max(0.1, socket_timeout or 1.0),  # waiting for a free connection is bounded too
        socket_timeout=socket_timeout,
        socket_connect_timeout=max(0.1, min(socket_timeout or 1.0, 1.0)),
    )
    return aioredis.Redis(connection_pool=pool)


class NearCache:
    """Posts recently read from Redis, in this process's memory: a dict in insertion order, so the
    oldest entry goes first when full and a lookup is one dict get and one clock read."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, CachedPost]] = {}

    def get(self, key: str, *, stale_ok: bool = False) -> CachedPost | None:
        """The post if still fresh; with ``stale_ok`` (Redis unavailable) whatever is still held."""
        entry = self._entries.get(key)
        if entry is None or (entry[0] < time.monotonic() and not stale_ok):
            return None
        return entry[1]

    def put(self, key: str, hit: CachedPost) -> None:
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entries[key] = (time.monotonic() + self.ttl_s, hit)

    def __len__(self) -> int:
        return len(self._entries)


class LookupBatcher:
    """Coalesces concurrent ``MGET`` calls into one round trip, self-clocked like the group commit.

    At most one ``MGET`` is in flight: lookups made while it is out wait for it to return and then
    go together, so batches grow with the load instead of the round trips. Why: each round trip
    costs this process two syscalls and redis-py's per-command work, and a py-spy profile of the API
    at 800 new tasks/s (every request a miss) put one ``MGET`` per request at ~105 µs of ~1085 µs of
    CPU: batching only what one event-loop turn had made left batches of about one (PERFORMANCE.md).
    At low load a lookup still goes at the next loop turn, alone.

    A failed round trip fails its batch and the lookups queued behind it with the same exception
    (each caller answers a miss): they would have waited for the same Redis, and sending them
    would make them wait out a second socket timeout. A caller that went away (cancelled) is skipped
    when results are handed out.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._pending: list[tuple[list[str], asyncio.Future[list[object]]]] = []
        self._scheduled = False
        self._inflight: asyncio.Task[None] | None = None

    async def mget(self, keys: list[str]) -> list[object]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[object]] = loop.create_future()
        self._pending.append((keys, future))
        if not self._scheduled and self._inflight is None:  # else it goes when the one in flight returns
            self._scheduled = True
            loop.call_soon(self._send)
        return await future

    def _send(self) -> None:
        self._scheduled = False
        if self._inflight is not None or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._inflight = asyncio.get_running_loop().create_task(self._mget(batch))
        self._inflight.add_done_callback(self._returned)

    def _returned(self, _task: asyncio.Task[None]) -> None:
        self._inflight = None
        self._send()

    async def _mget(self, batch: list[tuple[list[str], asyncio.Future[list[object]]]]) -> None:
        try:
            raws = await self.client.mget([key for keys, _ in batch for key in keys])
        except BaseException as exc:
            waiting, self._pending = self._pending, []
            failure = exc if isinstance(exc, Exception) else ConnectionError(repr(exc))
            for _, future in batch + waiting:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        offset = 0
        for keys, future in batch:
            if not future.done():
                future.set_result(list(raws[offset : offset + len(keys)]))
            offset += len(keys)


class Cache:
    """Best-effort GET/SET of posts; ``enabled=False`` (the baseline) is a permanent miss without metrics."""

    def __init__(self, settings: Settings, client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.enabled = settings.cache_enabled
        self.ttl = settings.cache_ttl_s
        self.client = client or make_redis(settings, socket_timeout=settings.redis_socket_timeout_s)
        self._batcher = LookupBatcher(self.client) if settings.cache_lookup_batching else None
        local = self.enabled and settings.cache_local_ttl_s > 0
        self.near = NearCache(settings.cache_local_ttl_s, settings.cache_local_max_entries) if local else None
        self.breaker = CircuitBreaker(
            settings.cache_breaker_failures, settings.cache_breaker_reset_s, metrics.CACHE_BREAKER_OPEN
        )

    def key(self, persona_id: str, topic: str) -> str:
        return cache_key(persona_id, topic, self.settings.prompt_version)

    async def get(self, key: str) -> CachedPost | None:
        """The cached post, or None on a miss, a malformed value or any Redis failure."""
        if not self.enabled:
            return None
        if not self.breaker.allow():
            _count(_MISS)
            return None
        try:
            raw = await self.client.get(key)
        except Exception as exc:  # any failure is a miss, never an error
            self.breaker.record_failure()
            _count(_ERR_GET)
            _count(_MISS)
            log.debug("cache get failed: %r", exc)
            return None
        self.breaker.record_success()
        hit = decode_hit(raw) if isinstance(raw, bytes) else None
        _count(_HIT if hit is not None else _MISS)
        return hit

    async def lookup(self, key: str, *, coalesce: bool) -> tuple[CachedPost | None, str | None]:
        """One round trip for the hot path: the cached post and, if ``coalesce``, the in-flight task id.

        An identical request whose task is still queued or running is answered from Redis alone, so
        hot keys never reach Postgres while their post is being written. Failures are misses. A post
        in the near cache answers without Redis.
        """
        if self.near is not None and (near := self.near.get(key)) is not None:
            _count(_HIT)
            _count(_HIT_LOCAL)
            return near, None
        keys = ([key] if self.enabled else []) + ([inflight_key(key)] if coalesce else [])
        if not keys:
            return None, None
        if not self.breaker.allow():
            return self._unavailable(key), None
        try:
            raws = await (self._batcher.mget(keys) if self._batcher is not None else self.client.mget(keys))
        except Exception as exc:  # any failure is a miss, never an error
            self.breaker.record_failure()
            _count(_ERR_GET)
            log.debug("cache lookup failed: %r", exc)
            return self._unavailable(key), None
        self.breaker.record_success()
        hit: CachedPost | None = None
        if self.enabled:
            raw = raws[0]
            hit = decode_hit(raw) if isinstance(raw, bytes) else None
            _count(_HIT if hit is not None else _MISS)
            if hit is not None and self.near is not None:
                self.near.put(key, hit)
        inflight = raws[-1] if coalesce else None
        return hit, inflight.decode() if isinstance(inflight, bytes) else None

    def _unavailable(self, key: str) -> CachedPost | None:
        """Redis could not answer: a post still held in memory (however old), else a miss."""
        if not self.enabled:
            return None
        stale = self.near.get(key, stale_ok=True) if self.near is not None else None
        if stale is None:
            _count(_MISS)
            return None
        _count(_HIT)
        _count(_HIT_LOCAL)
        _count(_HIT_STALE)
        return stale

    async def mark_inflight(self, key: str, task_id: str) -> None:
        """Best effort: later identical requests join ``task_id`` without a database round trip."""
        if not self.breaker.allow():
            return
        try:
            await self.client.set(inflight_key(key), task_id, nx=True, ex=INFLIGHT_TTL_S)
        except Exception as exc:
            self.breaker.record_failure()
            _count(_ERR_SET)
            log.debug("marking in-flight failed: %r", exc)
            return
        self.breaker.record_success()

    async def finish(self, posts: list[tuple[str, bytes]], finished_keys: list[str]) -> bool:
        """Worker side, one round trip: store posts (if enabled) and clear the in-flight marks of
        finished tasks (``finished_keys`` are post keys). False on failure (best effort)."""
        posts = posts if self.enabled else []
        if not posts and not finished_keys:
            return False
        if not self.breaker.allow():
            return False
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in posts:
                    pipe.set(key, value, ex=self.ttl)
                if finished_keys:
                    pipe.delete(*[inflight_key(k) for k in finished_keys])
                await pipe.execute()
        except Exception as exc:
            self.breaker.record_failure()
            _count(_ERR_SET)
            log.debug("cache finish failed: %r", exc)
            return False
        self.breaker.record_success()
        return True

    async def set_many(self, entries: list[tuple[str, bytes]]) -> bool:
        """Store ``(key, encode_hit(...))`` pairs with the TTL in one round trip; False on failure."""
        if not self.enabled or not entries:
            return False
        if not self.breaker.allow():
            return False
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in entries:
                    pipe.set(key, value, ex=self.ttl)
                await pipe.execute()
        except Exception as exc:
            self.breaker.record_failure()
            _count(_ERR_SET)
            log.debug("cache set failed: %r", exc)
            return False
        self.breaker.record_success()
        return True

    @staticmethod
    def delivered(hit: CachedPost) -> None:
        """Count a hit's tokens as delivered at $0 (the cost-per-1k denominator)."""
        with contextlib.suppress(Exception):
            _DELIVERED_CACHE.inc(hit.output_tokens)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


def _count(child: Counter) -> None:
    with contextlib.suppress(Exception):
        child.inc()
