"""The durable task queue: a Redis Stream consumer group, with the Postgres row as the source of truth.

Why Redis Streams and not Postgres ``FOR UPDATE SKIP LOCKED``:

* Workers block on ``XREADGROUP`` and get work the moment it exists, with no polling load on the
  database that also serves every API miss; Postgres stays on the write path only.
* The consumer group gives at-least-once delivery with per-consumer pending lists: an entry a worker
  read but did not ``XACK`` stays pending, and ``XAUTOCLAIM`` hands entries idle for longer than
  ``queue_claim_idle_ms`` (their consumer died) to a live worker. Live workers refresh the idle time
  of what they hold (``XCLAIM ... JUSTID``) so a slow LLM call is not stolen.
* Redis is already there for the cache, so the queue adds no component.

Why nothing accepted is lost, even though Redis is not the system of record:

1. ``POST /task`` commits the ``queued`` row first, then ``XADD``s its id. A 202 is only sent
   after the commit. If ``XADD`` fails (Redis down, breaker open) the request still succeeds.
2. Every ``queue_sweep_interval_s`` one worker (Postgres advisory lock) lists unfinished rows older
   than ``queue_sweep_grace_s`` and re-``XADD``s those whose id is in no stream entry. That covers a
   failed ``XADD``, a process that died between commit and ``XADD``, and a Redis that lost its data.
   The rows are read *before* the stream, so a race can only produce a duplicate, never a miss.
3. Duplicates are harmless: a worker claims rows in Postgres (``status IN ('queued','running')``) and
   completion is ``UPDATE ... WHERE status <> 'done'``, so a task is stored and counted once.
4. An entry is acknowledged (``XACK`` + ``XDEL``) only after its row is final (done/failed) or after
   a replacement entry was added (retry), so a crash at any point leaves the entry pending.
5. After ``queue_max_attempts`` deliveries the row is dead-lettered: status ``failed`` with the reason.
6. While the stream cannot be read, workers claim queued rows from Postgres directly
   (``Database.claim_queued``), so an outage delays nothing it does not have to.

Entries are deleted on acknowledgement, so the stream only holds live work (no trimming, which could
drop unacknowledged entries).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from sqlalchemy import text

from service import metrics
from service.breaker import CircuitBreaker
from service.config import Settings
from service.db import Database

log = logging.getLogger(__name__)

FIELD = b"task_id"
SWEEP_LOCK_ID = 0x10AD9801A

# KEYS[1] the stream, KEYS[2..] the in-flight marks of the flagged tasks, in order.
# ARGV[1] the marks' TTL (s), then per task: its id and 1 if it has a mark (else 0).
ENQUEUE_SCRIPT = f"""
local mark = 2
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', '{FIELD.decode()}', ARGV[i])
  if ARGV[i + 1] == '1' then
    redis.call('SET', KEYS[mark], ARGV[i], 'NX', 'EX', ARGV[1])
    mark = mark + 1
  end
end
return (#ARGV - 1) / 2
"""


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: bytes
    task_id: str


def _entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in raw or []:
        if not fields:  # deleted while pending (XAUTOCLAIM reports those separately in Redis 7)
            continue
        task_id = fields.get(FIELD)
        if task_id is not None:
            out.append(Entry(entry_id, task_id.decode() if isinstance(task_id, bytes) else str(task_id)))
    return out


class TaskQueue:
    """Thin, explicit wrapper over the stream commands the API and workers use."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.stream = settings.queue_stream
        self.group = settings.queue_group
        # Enqueue failures are tolerated (the sweeper re-enqueues); the breaker makes them instant.
        self.breaker = CircuitBreaker(settings.cache_breaker_failures, settings.cache_breaker_reset_s)
        self._enqueue = client.register_script(ENQUEUE_SCRIPT)

    async def ensure_group(self) -> None:
        """Create the stream and group if missing (idempotent; also after Redis lost its data)."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, task_id: str, inflight_key: str | None = None, inflight_ttl_s: int = 60) -> bool:
        """``XADD`` (and, for coalescing, ``SET inflight_key task_id NX EX``) in one round trip.

        Returns False (never raises) if Redis is unavailable: the row is durable, the sweeper catches up.
        """
        return await self.enqueue_group([(task_id, inflight_key)], inflight_ttl_s)

    async def enqueue_group(self, items: list[tuple[str, str | None]], inflight_ttl_s: int = 60) -> bool:
        """One script call for a group of accepted tasks: ``XADD`` each (in order) and set each in-flight
        mark (``SET NX EX``) where given. Returns False (never raises) if Redis is unavailable.

        A script, not a pipeline of 2 commands per task: redis-py's per-command packing and reply
        parsing was most of this call's CPU in the API (a py-spy profile at 1000 new tasks/s), and one reply
        per group costs the same for 1 task as for 200. Not atomic on failure (an entry may be added
        without its mark); either way the sweeper and Postgres' unique index keep the outcome right.
        """
        if not items:
            return True
        if not self.breaker.allow():
            return False
        keys: list[str] = [self.stream]
        args: list[str | int] = [inflight_ttl_s]
        for task_id, inflight_key in items:
            args += [task_id, 0 if inflight_key is None else 1]
            if inflight_key is not None:
                keys.append(inflight_key)
        try:
            await self._enqueue(keys=keys, args=args)
        except Exception as exc:
            self.breaker.record_failure()
            log.warning("enqueue of %d accepted tasks failed (sweeper will retry): %r", len(items), exc)
            return False
        self.breaker.record_success()
        return True

    async def mark_inflight(self, marks: list[tuple[str, str]], inflight_ttl_s: int = 60) -> None:
        """``SET inflight_key task_id NX EX`` for each pair, one round trip; best effort (a hint only)."""
        if not marks or not self.breaker.allow():
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for inflight_key, task_id in marks:
                    pipe.set(inflight_key, task_id, nx=True, ex=inflight_ttl_s)
                await pipe.execute()
        except Exception as exc:
            self.breaker.record_failure()
            log.debug("marking %d task(s) in flight failed: %r", len(marks), exc)
            return
        self.breaker.record_success()

    async def enqueue_many(self, task_ids: list[str]) -> None:
        """Raises on failure (the caller is a worker that can retry later)."""
        if not task_ids:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.xadd(self.stream, {FIELD: task_id.encode()})
            await pipe.execute()

    async def read(self, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for ``consumer``; ``block_ms=None`` returns at once."""
        try:
            raw = await self.client.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        entries: list[Entry] = []
        for _stream, items in raw or []:
            entries.extend(_entries(items))
        return entries

    async def autoclaim(self, consumer: str, count: int) -> list[Entry]:
        """Take over entries idle longer than ``queue_claim_idle_ms`` (their consumer is presumed dead)."""
        try:
            result = await self.client.xautoclaim(
                self.stream, self.group, consumer, min_idle_time=self.settings.queue_claim_idle_ms, count=count
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()
            return []
        return _entries(result[1] if len(result) > 1 else [])

    async def touch(self, consumer: str, entry_ids: list[bytes]) -> None:
        """Reset the idle time of entries we are still working on, so nobody reclaims them."""
        if entry_ids:
            ids: list[Any] = list(entry_ids)
            await self.client.xclaim(self.stream, self.group, consumer, 0, ids, justid=True)

    async def ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge and delete: the stream only ever holds live work."""
        if not entry_ids:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            await pipe.execute()

    async def task_ids_in_stream(self, page: int = 1000) -> set[str]:
        """Every task id with an entry in the stream (undelivered or pending)."""
        ids: set[str] = set()
        start = "-"
        while True:
            raw = await self.client.xrange(self.stream, min=start, max="+", count=page)
            if not raw:
                return ids
            for entry in _entries(raw):
                ids.add(entry.task_id)
            if len(raw) < page:
                return ids
            last = raw[-1][0].decode() if isinstance(raw[-1][0], bytes) else str(raw[-1][0])
            start = "(" + last

    async def depth_and_pending(self) -> tuple[int, int]:
        """(entries not yet delivered to the group, delivered but unacknowledged)."""
        groups = await self.client.xinfo_groups(self.stream)
        for g in groups:
            name = g.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                pending = int(g.get("pending") or 0)
                lag = g.get("lag")
                if lag is None:  # lag unknown after deletions: fall back to length minus pending
                    lag = max(0, int(await self.client.xlen(self.stream)) - pending)
                return int(lag), pending
        return int(await self.client.xlen(self.stream)), 0

    async def update_gauges(self) -> None:
        with contextlib.suppress(Exception):
            depth, pending = await self.depth_and_pending()
            metrics.QUEUE_DEPTH.set(depth)
            metrics.QUEUE_PENDING.set(pending)


async def sweep(queue: TaskQueue, db: Database) -> list[str]:
    """Re-enqueue accepted tasks that have no stream entry (see the module docstring, point 2).

    Only one process sweeps at a time (advisory lock held for the transaction); the others skip.
    Returns the re-enqueued task ids. Raises if Redis is unreachable (the caller retries later).
    """
    grace = queue.settings.queue_sweep_grace_s
    async with db.connect(transaction=True) as conn:
        if not await db.try_lock(conn, SWEEP_LOCK_ID):
            return []
        rows = await conn.execute(
            text(
                "SELECT id::text FROM tasks WHERE status IN ('queued', 'running') AND "
                "COALESCE(started_at, accepted_at) < now() - make_interval(secs => :grace) "
                "ORDER BY accepted_at LIMIT 5000"
            ),
            {"grace": grace},
        )
        candidates = [str(r[0]) for r in rows.all()]
        if not candidates:
            return []
        await queue.ensure_group()
        present = await queue.task_ids_in_stream()  # read after the rows: a race can only duplicate
        missing = [t for t in candidates if t not in present]
        await queue.enqueue_many(missing)
    if missing:
        log.warning("sweeper re-enqueued %d accepted task(s) missing from the stream", len(missing))
        with contextlib.suppress(Exception):
            metrics.TASKS.labels("swept").inc(len(missing))
    return missing
