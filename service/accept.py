"""Group commit for new tasks: many accepted requests, one INSERT, one scripted XADD call.

Why: with durable Postgres (fsync on) every autocommit INSERT waits for its own WAL flush, and each
statement and Redis round trip costs CPU in this process. A new task is accepted like a producer
with ``linger.ms``: requests arriving within ``accept_linger_ms`` (or until ``accept_batch_max``)
are written by one multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` and their ids by one
script call that ``XADD``s each (+ the in-flight marks), so one commit and one round trip serve the
whole group.

What does not change:

* **No 202 before the commit.** A request's future resolves only after the INSERT returned (the
  connection is in autocommit: returned means committed). If the INSERT fails, every request of
  the group gets the exception and answers 503; none is acknowledged.
* **XADD after the commit, off the request's path, failures tolerated.** A group is answered when
  its INSERT returned; its entries (and in-flight marks) are added by one script call right after,
  in commit order, batched with whatever committed meanwhile. A failed call or a crash between
  commit and XADD leaves committed rows without a stream entry; the sweeper
  (``service.queue.sweep``) re-enqueues them, exactly as for a single request.
* **Identical tasks join in the group.** Unkeyed requests for the same post in one group become one
  row: the first inserts it, the others join its id (a 202 for the same task, counted coalesced).
  One that conflicts with an unfinished task committed earlier joins that task, found for the whole
  group by one ``SELECT``. Under a Zipf workload these are most of the conflicts, and taking them one
  request at a time (two statements each) cost more than the group saved.
* **Other conflicts keep their meaning.** A row that did not insert and has no unfinished task to
  join (an idempotency key already used; a task that finished in between) is answered by the
  per-request path (:meth:`Database.insert_task`), which finds the task to join or replay.
* **Order.** Within a process, entries are appended in the order the requests were accepted.

**At most ``max_writes`` group INSERTs in flight per process** (default 1). New tasks that arrive
while that many are being written wait for one to end and then go together, so the groups grow with
the load instead of the concurrent writes: self-clocking group commit. Measured on the 2-core box
(PERFORMANCE.md): three default demos at 1 had p95 20.7, 41.7 and 57.0 ms against 50.5-69.9 ms at
64, and 1000 new tasks/s shed fewer requests. An earlier trial of 1 dropped iterations in the demo,
but then every local process ran in a session of its own (nice did nothing) and a request also
waited for its group's XADD; neither is true any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from service import metrics
from service.db import Database
from service.queue import TaskQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NewTask:
    task_id: str
    persona_id: str
    topic: str
    cache_key: str
    coalesce_key: str | None
    idempotency_key: str | None
    inflight_key: str | None  # Redis key marking the task in flight (coalescing), set with the XADD


@dataclass(frozen=True, slots=True)
class Accepted:
    """The task a request maps to: its own new row (``created``) or an unfinished identical one."""

    task_id: str
    created: bool
    status: str = "queued"


class GroupCommitter:
    """Collects new tasks for up to ``linger_s`` (or ``max_batch``) and writes each group at once."""

    def __init__(
        self,
        db: Database,
        queue: TaskQueue,
        *,
        linger_s: float,
        max_batch: int,
        inflight_ttl_s: int,
        max_writes: int = 1,
    ) -> None:
        self.db = db
        self.queue = queue
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.max_writes = max_writes
        self.inflight_ttl_s = inflight_ttl_s
        self._pending: list[tuple[NewTask, asyncio.Future[Accepted | None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._to_enqueue: list[tuple[str, str | None]] = []  # committed, not yet handed to Redis
        self._enqueuer: asyncio.Task[None] | None = None

    async def submit(self, task: NewTask) -> Accepted | None:
        """The task once its row, or the unfinished row it joins, is committed (XADD attempted); None if
        it conflicted otherwise and must take the per-request path. Raises what the INSERT raised (the
        caller answers 503)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Accepted | None] = loop.create_future()
        self._pending.append((task, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None and len(self._flushes) < self.max_writes:  # else it goes when a write ends
            self._timer = loop.call_later(self.linger_s, self._flush)
        # shield: a cancelled request must not cancel the group's write (the row may commit anyway)
        return await asyncio.shield(future)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending and len(self._flushes) < self.max_writes:
            group, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            flush = asyncio.create_task(self._write(group))
            self._flushes.add(flush)
            flush.add_done_callback(self._written)

    def _written(self, flush: asyncio.Task[None]) -> None:
        """A write ended: a group held back by the cap (no linger timer runs for it) goes now. One whose
        linger is still running waits for it, as without the cap, so below the cap groups form
        exactly as they did before the cap existed."""
        self._flushes.discard(flush)
        if self._pending and self._timer is None:
            self._flush()

    async def _write(self, group: list[tuple[NewTask, asyncio.Future[Accepted | None]]]) -> None:
        leaders: dict[str, NewTask] = {}  # coalesce key -> the group's first unkeyed task for it
        rows: list[NewTask] = []
        for task, _ in group:
            joinable = task.coalesce_key is not None and task.idempotency_key is None
            if joinable and task.coalesce_key in leaders:
                continue  # joins its leader's row
            if joinable:
                leaders[str(task.coalesce_key)] = task
            rows.append(task)
        with contextlib.suppress(Exception):
            metrics.ACCEPT_GROUP_SIZE.observe(len(rows))
        try:
            created = await self.db.insert_tasks(rows)
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        self._enqueue([(t.task_id, t.inflight_key) for t in rows if t.task_id in created])
        self._answer(group, leaders, created, {}, final=False)  # the committed ones need not wait below
        unfinished: dict[str, tuple[str, str]] = {}
        lost = [key for key, leader in leaders.items() if leader.task_id not in created]
        if lost:
            try:
                unfinished = await self.db.unfinished_by_coalesce_key(lost)
            except Exception as exc:  # those requests take the per-request path; the created ones stand
                log.warning("looking up unfinished tasks to join failed: %r", exc)
            # Redis had no mark for them (forgotten, or not yet set): mark again so the next join is Redis alone
            marks = [(t.inflight_key, unfinished[k][0]) for k, t in leaders.items() if k in unfinished]
            await self.queue.mark_inflight([(m, i) for m, i in marks if m is not None], self.inflight_ttl_s)
        self._answer(group, leaders, created, unfinished, final=True)

    @staticmethod
    def _answer(
        group: list[tuple[NewTask, asyncio.Future[Accepted | None]]],
        leaders: dict[str, NewTask],
        created: set[str],
        unfinished: dict[str, tuple[str, str]],
        *,
        final: bool,
    ) -> None:
        """Resolve the futures whose answer is known; with ``final`` every one (None = per-request path)."""
        for task, future in group:
            if future.done():
                continue
            leader = leaders.get(str(task.coalesce_key)) if task.idempotency_key is None else None
            if task.task_id in created:
                future.set_result(Accepted(task.task_id, created=True))
            elif leader is not None and leader.task_id in created:
                future.set_result(Accepted(leader.task_id, created=False))
            elif leader is not None and leader.coalesce_key in unfinished:
                task_id, status = unfinished[str(leader.coalesce_key)]
                future.set_result(Accepted(task_id, created=False, status=status))
            elif final:
                future.set_result(None)

    def _enqueue(self, items: list[tuple[str, str | None]]) -> None:
        """Hand committed tasks to the stream in commit order, without making their requests wait.

        The 202 needs the commit, not the XADD (whose failure is tolerated anyway: the sweeper
        re-enqueues), so a group is answered as soon as its INSERT returned and the next group's
        INSERT can start while this one's entries are written. One enqueue runs at a time per
        process, so entries keep commit order, and what commits meanwhile goes in the next call.
        """
        if not items:
            return
        self._to_enqueue.extend(items)
        if self._enqueuer is None:
            self._enqueuer = asyncio.get_running_loop().create_task(self._drain_enqueue())

    async def _drain_enqueue(self) -> None:
        try:
            while self._to_enqueue:
                items, self._to_enqueue = self._to_enqueue, []
                await self.queue.enqueue_group(items, self.inflight_ttl_s)  # never raises
        finally:
            self._enqueuer = None

    async def enqueued(self) -> None:
        """Wait until every task committed so far was handed to Redis (attempted)."""
        while self._enqueuer is not None:
            await asyncio.shield(self._enqueuer)

    async def aclose(self) -> None:
        """Write what is pending and wait for every write in progress (drain on shutdown)."""
        self._flush()
        while self._flushes:  # each write that ends starts the next group
            await asyncio.gather(*self._flushes, return_exceptions=True)
        await self.enqueued()
