"""The persona runtime: ``python -m service.worker`` turns queued tasks into posts, in micro-batches.

One collector loop per process (not a timer per task) fills a batch adaptively: it blocks on
``XREADGROUP`` for the first entry, and that read takes whatever else is already waiting (up to
``batch_size``). It waits for more — at most ``batch_wait_ms`` — only while that pays: when the
rate at which this worker has been receiving entries says the batch will be full within that time.
So a lone task goes at once (a batch of 1 or 2 when nothing is queued), and batches grow with the load
and the backlog up to ``batch_size`` (fewer calls, one system prompt shared by more tasks).

Each batch becomes ONE streamed ``LLMClient.generate`` call. Each task is finished the moment its
item closes in the stream: post stored in Postgres (idempotent: a task already done is neither
overwritten nor counted again), then cached, then its stream entry acknowledged (see
``service.queue``) — by one post writer per worker, in groups, whatever the number of open
streams. The call's usage arrives with its last chunk; each task's exact share is then written in
one UPDATE per call (``Database.record_usage``), so tokens and cost of a done task read null for
the seconds in between — never an estimate. An item missing or malformed in the reply is
retried alone once (``generate([item])``) and carries both calls' usage. At most
``worker_concurrency`` batches run at once: the collector takes a slot *before* reading, so a busy
worker leaves entries to its peers.

Retryable failures re-enqueue the task until ``queue_max_attempts`` deliveries, then it is
dead-lettered (status ``failed`` with the reason). While the LLM circuit breaker is open the worker
stops pulling work, and tasks that hit the open breaker get their attempt back.

SIGTERM/SIGINT: stop reading, let in-flight batches finish within ``shutdown_timeout_s``; anything
unfinished stays pending in the stream and is reclaimed by another worker after ``queue_claim_idle_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service import metrics
from service.cache import Cache, encode_hit, make_redis
from service.config import Settings, get_settings
from service.db import Database
from service.limiter import AdaptiveLimiter
from service.llm import LLMClient, LLMError, LLMItem, LLMItemResult
from service.pressure import POLL_S as PRESSURE_POLL_S
from service.pressure import under_pressure
from service.queue import Entry, TaskQueue, sweep

log = logging.getLogger("loadproof.worker")
SWEEP_DUTY_FACTOR = 20  # wait at least this many times the last sweep took (<= ~5 % of the time)

BLOCK_MS = 1000  # longest XREADGROUP block: bounds how long a stop request waits
GAUGE_INTERVAL_S = 2.0
LOOP_STALL_S = 30.0  # /healthz fails when the event loop has not turned for this long
ERROR_BACKOFF_S = 0.5
RATE_TAU_S = 1.0  # time constant of the arrival-rate estimate behind adaptive batching


def _inc(event: str, amount: float = 1.0) -> None:
    with contextlib.suppress(Exception):
        metrics.TASKS.labels(event).inc(amount)


class Worker:
    """One worker process: collector, batch runners and housekeeping loops."""

    def __init__(self, settings: Settings, *, consumer: str | None = None, llm: LLMClient | None = None) -> None:
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.db = Database(settings)
        # The queue connection blocks up to BLOCK_MS, so its socket timeout is longer than the cache's.
        self.redis = make_redis(
            settings, socket_timeout=BLOCK_MS / 1000 + 5.0, pool_size=settings.worker_concurrency + 8
        )
        self.cache = Cache(settings, make_redis(settings, socket_timeout=settings.redis_socket_timeout_s, pool_size=16))
        self.queue = TaskQueue(settings, self.redis)
        self.limiter = AdaptiveLimiter(settings)
        self.llm = llm or LLMClient(settings)
        if self.llm.limiter is None:
            self.llm.limiter = self.limiter
        else:
            self.limiter = self.llm.limiter
        self.stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._room = asyncio.Event()  # set when a batch finishes: the limit may admit another
        self._arrivals = ArrivalRate(RATE_TAU_S)
        self._closing: list[_Closed] = []  # streamed posts waiting for the post writer
        self._writer: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._held: set[bytes] = set()  # entry ids we are working on (heartbeat keeps them ours)
        self._pressure = False  # an API process shed for overload lately: hold fewer batches
        self._queue_down = False  # the last read of the queue failed: claiming from Postgres instead
        self._direct = 0  # tasks claimed from Postgres since then
        self._next_claim = 0.0
        self._started = False
        self._ready = False
        self.last_beat = time.monotonic()  # event-loop heartbeat for /healthz
        self._claim_every_s = max(0.5, settings.queue_claim_idle_ms / 2000)

    @property
    def ready(self) -> bool:
        """Takes work: schema and consumer group in place, not draining."""
        return self._ready and not self.stopping.is_set()

    def alive(self, stall_s: float = LOOP_STALL_S) -> bool:
        """The event loop still turns (a wedged loop would hold its tasks forever)."""
        return time.monotonic() - self.last_beat < stall_s

    async def _beat(self) -> None:
        self.last_beat = time.monotonic()

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stop requested: no new reads; finishing %d batch(es)", len(self._batches))
            self.stopping.set()

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Schema and consumer group; waits for Redis if it is not up yet."""
        if self._started:
            return
        self._started = True
        await self.db.wait_and_create_schema()
        while not self.stopping.is_set():
            try:
                await self.queue.ensure_group()
                self._ready = True
                return
            except Exception as exc:  # Redis not up yet: keep trying, the API still accepts tasks
                log.warning("queue not reachable yet (%r); retrying", exc)
                await asyncio.sleep(1.0)

    async def run(self) -> None:
        """Until :meth:`stop`; then drain within ``shutdown_timeout_s``."""
        await self.start()
        loops = [
            asyncio.create_task(self._every(self._claim_every_s / 1.5, self._heartbeat), name="heartbeat"),
            asyncio.create_task(self._sweeper(), name="sweeper"),
            asyncio.create_task(self._every(GAUGE_INTERVAL_S, self.queue.update_gauges), name="gauges"),
            asyncio.create_task(self._every(1.0, self._beat), name="beat"),
        ]
        if self.settings.overload_signal_ttl_ms > 0:  # the API signals only then (same settings)
            loops.append(asyncio.create_task(self._every(PRESSURE_POLL_S, self._read_pressure), name="pressure"))
        try:
            await self._collect()
            if self._batches:
                _done, pending = await asyncio.wait(set(self._batches), timeout=self.settings.shutdown_timeout_s)
                if pending:
                    log.warning("%d batch(es) unfinished at shutdown; left pending for reclaim", len(pending))
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
            if self._writer is not None:  # posts that closed before the end are stored before we close
                await asyncio.wait({self._writer}, timeout=self.settings.shutdown_timeout_s)
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.llm.aclose()
        await self.cache.aclose()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        await self.db.aclose()

    async def _every(self, interval_s: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s failed: %r", getattr(fn, "__name__", fn), exc)

    async def _read_pressure(self) -> None:
        pressure = await under_pressure(self.settings, self.cache.client)
        if pressure != self._pressure:
            log.info(
                "API %s; batches in flight up to %s",
                "shedding" if pressure else "no longer shedding",
                self.settings.worker_pressure_batches if pressure else "the adaptive limit",
            )
            self._pressure = pressure
            with contextlib.suppress(Exception):
                metrics.WORKER_YIELDING.set(1 if pressure else 0)

    def _batch_limit(self) -> int:
        """The adaptive limit, or ``worker_pressure_batches`` while the API sheds (see service.pressure)."""
        if self._pressure:
            return min(self.limiter.limit, self.settings.worker_pressure_batches)
        return self.limiter.limit

    async def _heartbeat(self) -> None:
        if self._held:
            await self.queue.touch(self.consumer, list(self._held))

    async def _sweeper(self) -> None:
        """``sweep`` every ``queue_sweep_interval_s``, but never more than ~5 % of the time.

        A sweep reads the whole stream; with a backlog of tens of thousands of tasks that costs this
        process (and Redis) a visible fraction of a core, which at 1000 new tasks/s showed up as
        request stalls. Waiting at least 20x the last sweep's duration bounds that cost; a missing
        entry is still found, only later — and a task at the back of such a backlog waits longer
        than that for a worker anyway.
        """
        wait_s = self.settings.queue_sweep_interval_s
        while True:
            await asyncio.sleep(wait_s)
            started = time.monotonic()
            try:
                await sweep(self.queue, self.db)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sweep failed: %r", exc)
            wait_s = max(self.settings.queue_sweep_interval_s, SWEEP_DUTY_FACTOR * (time.monotonic() - started))

    # --- collecting batches ---------------------------------------------------------------------
    async def _collect(self) -> None:
        while not self.stopping.is_set():
            if self.llm.breaker.is_open:  # do not pull work that would fail fast
                await asyncio.sleep(0.2)
                continue
            await self._take_slot()
            try:
                entries = await self._gather_batch()
            except Exception as exc:
                rows = await self._claim_from_postgres(exc)
                if rows:
                    self._start_batch(self._work({r["id"]: r for r in rows}, {}))
                else:
                    self._give_slot()
                    await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            if self._queue_down:
                log.warning("queue readable again; %d task(s) were claimed from Postgres meanwhile", self._direct)
                self._queue_down, self._direct = False, 0
            if not entries:
                self._give_slot()
                continue
            self._start_batch(self._run_batch(entries))

    def _start_batch(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    async def _claim_from_postgres(self, exc: Exception) -> list[dict[str, Any]]:
        """While the queue cannot be read, claim queued tasks from their rows (the queue of record).

        Tasks accepted during a Redis outage are then worked on as they come instead of waiting for
        the sweeper, which hands all of them over at once when Redis returns: measured in the chaos
        campaign, that catch-up (and the polls of clients waiting for those tasks) was what kept
        latency high for 10-20 s after Redis was back. A duplicate delivery (a stream entry for a
        task claimed here) is harmless, as for every redelivery. Returns [] on a Postgres error too.
        """
        if not self._queue_down:
            self._queue_down = True
            log.warning("reading the queue failed (%r); claiming queued tasks from Postgres meanwhile", exc)
        try:
            rows = await self.db.claim_queued(self.settings.batch_size)
        except Exception as db_exc:
            log.warning("claiming from Postgres failed too: %r", db_exc)
            return []
        if rows:
            self._direct += len(rows)
            _inc("claimed_direct", len(rows))
        return rows

    # Concurrency control lives in these two methods (and ``self._slots``, ``self._room``) only.
    async def _take_slot(self) -> None:
        """Wait for room for one more batch in flight (its LLM call and any retries of its items).

        ``worker_concurrency`` is the hard bound; below it, the adaptive limiter's current limit
        decides. Waiting here, before reading, leaves entries in the stream for other workers rather
        than holding them while the limiter would make their call wait anyway."""
        await self._slots.acquire()
        while len(self._batches) >= self._batch_limit() and not self.stopping.is_set():
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 0.25)  # the limit also moves without a batch ending

    def _give_slot(self) -> None:
        self._slots.release()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._give_slot()
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("batch failed; its entries stay pending for reclaim", exc_info=task.exception())

    async def _gather_batch(self) -> list[Entry]:
        """Reclaimed entries or the first new ones, what else is waiting, and more only while it pays."""
        size = self.settings.batch_size
        entries: list[Entry] = []
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self._claim_every_s
            reclaimed = await self.queue.autoclaim(self.consumer, size)
            if reclaimed:
                _inc("reclaimed", len(reclaimed))
                log.info("reclaimed %d entr(y/ies) idle > %d ms", len(reclaimed), self.settings.queue_claim_idle_ms)
                entries.extend(reclaimed)
        if not entries:  # wakes at the first entry with everything already waiting, up to ``size``
            entries = await self.queue.read(self.consumer, size, BLOCK_MS)
            if not entries:
                return []
            self._arrivals.add(len(entries))
        elif len(entries) < size:  # after reclaimed entries: what is already waiting, without blocking
            more = await self.queue.read(self.consumer, size - len(entries), None)
            self._arrivals.add(len(more))
            entries.extend(more)
        cap_s = self.settings.batch_wait_ms / 1000
        if len(entries) >= size or not worth_waiting(size - len(entries), self._arrivals.rate(), cap_s):
            return entries
        deadline = time.monotonic() + cap_s
        while len(entries) < size and not self.stopping.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            more = await self.queue.read(self.consumer, size - len(entries), remaining_ms)
            if not more:
                break
            self._arrivals.add(len(more))
            entries.extend(more)
        return entries

    # --- one batch ------------------------------------------------------------------------------
    async def _run_batch(self, entries: Sequence[Entry]) -> None:
        held = [e.entry_id for e in entries]
        self._held.update(held)
        try:
            await self._process(entries)
        finally:
            self._held.difference_update(held)

    async def _process(self, entries: Sequence[Entry]) -> None:
        by_task: dict[str, list[bytes]] = {}
        for e in entries:
            by_task.setdefault(e.task_id, []).append(e.entry_id)
        valid = [t for t in by_task if _is_uuid(t)]
        rows = {r["id"]: r for r in await self.db.claim(valid)}
        # Finished, unknown or garbage ids: nothing to do, acknowledge.
        await self.queue.ack([eid for t, eids in by_task.items() if t not in rows for eid in eids])
        await self._work(rows, by_task)

    async def _work(self, rows: dict[str, dict[str, Any]], by_task: dict[str, list[bytes]]) -> None:
        """One LLM call for claimed ``rows``; ``by_task``: their stream entries (none when claimed from
        Postgres), acknowledged as each task becomes final."""
        live: list[dict[str, Any]] = []
        for row in rows.values():
            if row["attempts"] > self.settings.queue_max_attempts:
                await self._dead_letter(row, f"delivered {row['attempts'] - 1} times without finishing", by_task)
            else:
                live.append(row)
        if not live:
            return
        items = [LLMItem(r["id"], r["persona_id"], r["topic"]) for r in live]
        finisher = _Finisher(self, rows, by_task)
        try:
            try:
                results = await self.llm.generate(items, finisher.post)
            except LLMError as exc:
                await finisher.drain()  # items that closed before the call failed are done
                for row in live:
                    if row["id"] not in finisher.closed:
                        await self._failed(row, str(exc), exc.retryable, exc.outcome == "breaker_open", by_task)
                return
            await finisher.drain()
            await finisher.bill([r for r in results if r.post is not None])
            bad = [(item, r) for item, r in zip(items, results, strict=True) if r.post is None]
            if not bad:
                return
            _inc("retried", len(bad))
            retried = await asyncio.gather(*(self._retry_alone(item, finisher) for item, _ in bad))
            await finisher.drain()
            billed: list[LLMItemResult] = []
            for (item, first), outcome in zip(bad, retried, strict=True):
                if isinstance(outcome, LLMItemResult) and outcome.post is not None:
                    billed.append(_merge_usage(first, outcome))
                else:
                    row = rows[item.id]
                    if isinstance(outcome, LLMError):
                        await self._failed(
                            row, str(outcome), outcome.retryable, outcome.outcome == "breaker_open", by_task
                        )
                    else:
                        reason = (outcome.error if isinstance(outcome, LLMItemResult) else None) or first.error
                        await self._failed(row, f"malformed LLM output: {reason}", True, False, by_task)
            await finisher.bill(billed)
        finally:
            await finisher.close()

    async def _retry_alone(self, item: LLMItem, finisher: _Finisher) -> LLMItemResult | LLMError:
        try:
            return (await self.llm.generate([item], finisher.post))[0]
        except LLMError as exc:
            return exc

    async def _store(self, closed: list[_Closed]) -> set[str]:
        """Finish tasks whose post just closed: Postgres, cache, then ack. The ids stored now."""
        stored = await self.db.complete([(c.task_id, c.post, None, None, None) for c in closed])
        if stored:
            with contextlib.suppress(Exception):
                metrics.TASKS.labels("completed").inc(len(stored))
                for row in stored:
                    metrics.TASK_COMPLETION.observe(max(0.0, float(row["completion_s"] or 0.0)))
        # Cache only what was stored now: for a duplicate delivery the first stored post stays the
        # one everybody sees (GET /task and cache hits agree). Postgres first, then the cache, so a
        # post is never served that the task store does not have; an identical request arriving in
        # between may still join the (just finished) task with a 202 and find it done when it polls.
        # The entry's token count is 0 until the call's usage is known (``_Finisher.bill`` rewrites it).
        ids = {row["id"] for row in stored}
        await self.cache.finish(
            [(c.cache_key, encode_hit(c.task_id, c.post, 0)) for c in closed if c.task_id in ids],
            [c.cache_key for c in closed],
        )
        acked = [eid for c in closed for eid in c.entry_ids]
        try:
            await self.queue.ack(acked)
        except Exception as exc:  # stored is stored: the entries are redelivered, found done and acked then
            log.warning("acknowledging %d stored task(s) failed: %r", len(acked), exc)
        self._held.difference_update(acked)
        return ids

    def _submit(self, closed: _Closed) -> None:
        """Queue a closed post for the worker's one post writer (started on demand)."""
        self._closing.append(closed)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_posts(), name="posts")

    async def _write_posts(self) -> None:
        """Stores closed posts for every batch of this worker, one group per round trip.

        One writer keeps per-item writes to one database connection however many streams are open,
        and posts that close while a write is in flight go together in the next one: under load (or
        a slow database) groups grow instead of connections.
        """
        while self._closing:
            group, self._closing = self._closing, []
            try:
                stored = await self._store(group)
            except Exception as exc:
                for c in group:
                    _settle(c.done, exc)
                continue
            for c in group:
                _settle(c.done, c.task_id in stored)

    async def _failed(
        self, row: dict[str, Any], reason: str, retryable: bool, refund: bool, by_task: dict[str, list[bytes]]
    ) -> None:
        """Retry (re-enqueue, then ack the old entry) or dead-letter."""
        task_id = row["id"]
        if refund or (retryable and row["attempts"] < self.settings.queue_max_attempts):
            if await self.db.requeue(task_id, reason, refund_attempt=refund):
                try:
                    await self.queue.enqueue_many([task_id])
                except Exception as exc:  # queued in Postgres: claimed from there or swept back
                    log.warning("re-enqueueing task %s failed: %r", task_id, exc)
                    if by_task.get(task_id):
                        raise  # keep the old entry pending: it is redelivered
                if not refund:
                    _inc("retried")
            await self.queue.ack(by_task.get(task_id, []))
            return
        if not retryable:
            if await self.db.fail(task_id, reason):
                _inc("failed")
            await self.cache.finish([], [row["cache_key"]])
            await self.queue.ack(by_task.get(task_id, []))
            return
        await self._dead_letter(row, reason, by_task)

    async def _dead_letter(self, row: dict[str, Any], reason: str, by_task: dict[str, list[bytes]]) -> None:
        attempts = min(row["attempts"], self.settings.queue_max_attempts)
        if await self.db.fail(row["id"], f"dead-lettered after {attempts} attempt(s): {reason}"):
            _inc("failed")
            _inc("dead_lettered")
        await self.cache.finish([], [row["cache_key"]])  # the next identical request starts afresh
        await self.queue.ack(by_task.get(row["id"], []))


@dataclass(slots=True)
class _Closed:
    """A post that closed in a stream, on its way to Postgres; ``done`` says whether it was stored now."""

    task_id: str
    post: str
    cache_key: str
    entry_ids: list[bytes]
    done: asyncio.Future[bool]


def _settle(future: asyncio.Future[bool], outcome: bool | Exception) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _Finisher:
    """Finishes the tasks of one batch as their posts stream in, then bills them once usage is known.

    ``post`` is the LLM client's sink (it must not block): it hands the post to the worker's post
    writer. ``drain`` waits for this batch's posts and raises a failed write; the entries of posts
    not stored stay unacknowledged and are reclaimed later (a task stored already is then simply
    acknowledged).
    """

    def __init__(self, worker: Worker, rows: dict[str, dict[str, Any]], by_task: dict[str, list[bytes]]) -> None:
        self._worker = worker
        self._rows = rows
        self._by_task = by_task
        self._pending: list[_Closed] = []
        self.closed: set[str] = set()  # posts handed over by the LLM client (stored now or before)
        self._stored: dict[str, str] = {}  # stored by this batch, not yet billed: id -> post

    def post(self, task_id: str, post: str) -> None:
        self.closed.add(task_id)
        closed = _Closed(
            task_id,
            post,
            self._rows[task_id]["cache_key"],
            self._by_task.get(task_id, []),
            asyncio.get_running_loop().create_future(),
        )
        self._pending.append(closed)
        self._worker._submit(closed)

    async def drain(self) -> None:
        """Wait until every post handed over so far is written; raise the first write failure."""
        pending = list(self._pending)
        if pending:
            await asyncio.wait([c.done for c in pending])  # unlike gather, a cancelled wait leaves them be
        self._pending = self._pending[len(pending) :]
        failure: BaseException | None = None
        for c in pending:
            outcome = c.done.exception() if not c.done.cancelled() else asyncio.CancelledError()
            if outcome is not None:
                failure = failure or outcome
            elif c.done.result():
                self._stored[c.task_id] = c.post
        if failure is not None:
            raise failure

    async def bill(self, results: Sequence[LLMItemResult]) -> None:
        """Write the billed share of the tasks this batch stored (one UPDATE), and what it delivered.

        The cache entries get their token counts first, so once a task shows its usage its cached
        post counts the same tokens as delivered.
        """
        usage = [(r.id, r.input_tokens, r.output_tokens, r.cost_usd) for r in results if r.id in self._stored]
        if not usage:
            return
        posts = {task_id: self._stored.pop(task_id) for task_id, *_ in usage}
        await self._worker.cache.set_many(
            [
                (self._rows[task_id]["cache_key"], encode_hit(task_id, posts[task_id], tout))
                for task_id, _tin, tout, _cost in usage
            ]
        )
        billed = await self._worker.db.record_usage(usage)
        with contextlib.suppress(Exception):
            metrics.TOKENS_DELIVERED.labels("llm").inc(sum(int(row["output_tokens"] or 0) for row in billed))

    async def close(self) -> None:
        """Tasks stored but never billed (the stream broke off before its usage): 0, as for any call
        without usage. Posts still being written (cancellation) are left to the writer: stored, they
        show no usage; not stored, their entries are reclaimed."""
        for c in self._pending:
            if c.done.done() and not c.done.cancelled() and c.done.exception() is None and c.done.result():
                self._stored[c.task_id] = c.post
            else:  # nobody waits for it any more: do not let a failure go unretrieved
                c.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending = []
        if self._stored:
            log.warning("%d streamed post(s) without usage; recording 0 tokens and $0", len(self._stored))
            unbilled = [LLMItemResult(task_id, post, None, 0, 0, 0.0) for task_id, post in self._stored.items()]
            with contextlib.suppress(Exception):
                await self.bill(unbilled)


class ArrivalRate:
    """Entries per second this worker has been receiving, decayed exponentially over ``tau_s``."""

    def __init__(self, tau_s: float, clock: Any = time.monotonic) -> None:
        self._tau_s = tau_s
        self._clock = clock
        self._level = 0.0
        self._at = clock()

    def _decay(self) -> None:
        now = self._clock()
        self._level *= math.exp(-(now - self._at) / self._tau_s)
        self._at = now

    def add(self, count: int) -> None:
        if count:
            self._decay()
            self._level += count

    def rate(self) -> float:
        self._decay()
        return self._level / self._tau_s


def worth_waiting(missing: int, rate_per_s: float, cap_s: float) -> bool:
    """Wait for ``missing`` more entries only if, at the current rate, they arrive within ``cap_s``.

    Waiting adds its whole duration to every task of the batch, and under streaming each extra item
    adds its generation time to the items after it, so a partial batch goes at once unless the
    load fills it quickly anyway (then one shared system prompt per ``batch_size`` tasks).
    """
    return missing > 0 and cap_s > 0 and rate_per_s > 0 and missing / rate_per_s <= cap_s


def _merge_usage(first: LLMItemResult, retry: LLMItemResult) -> LLMItemResult:
    """The retried item carries both calls' usage: its share of the failed batch was billed too."""
    return LLMItemResult(
        retry.id,
        retry.post,
        None,
        first.input_tokens + retry.input_tokens,
        first.output_tokens + retry.output_tokens,
        first.cost_usd + retry.cost_usd,
    )


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def _main(settings: Settings) -> None:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    # Probes and metrics answer from their own thread, so a slow batch never fails a probe, and
    # from before start() so that liveness holds while Postgres/Redis are still coming up.
    server = serve_probes(worker, settings.host, settings.worker_metrics_port, metrics=settings.metrics_enabled)
    await worker.start()
    log.info(
        "worker %s: batch_size=%d batch_wait_ms=%d concurrency=%d metrics on :%d",
        worker.consumer,
        settings.batch_size,
        settings.batch_wait_ms,
        settings.worker_concurrency,
        settings.worker_metrics_port,
    )
    try:
        await worker.run()
    finally:
        server.shutdown()
        server.server_close()


def serve_probes(worker: Worker, host: str, port: int, *, metrics: bool = True) -> ThreadingHTTPServer:
    """``/healthz`` (loop alive), ``/readyz`` (taking work) and ``/metrics`` on the worker's port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics" and metrics:
                self._answer(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = worker.alive()
                self._answer(200 if ok else 503, b'{"status":"ok"}' if ok else b'{"status":"stalled"}')
            elif path == "/readyz":
                ok = worker.ready
                self._answer(200 if ok else 503, b'{"status":"ready"}' if ok else b'{"status":"not ready"}')
            else:
                self._answer(404, b'{"detail":"not found"}')

        def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: no log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # one line per LLM call is not a log
    # uvloop, as the API: a worker's CPU goes mostly to the loop's I/O (one wake-up per streamed chunk, per
    # query), and it shares the cores with the API it must not slow down.
    gc.collect()
    gc.freeze()  # as the API (service/orchestrator.py): full collections walk only what the work allocates
    uvloop.run(_main(get_settings()))


if __name__ == "__main__":
    main()
