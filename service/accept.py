"""Group commit for new tasks: many accepted requests, one INSERT, one pipelined XADD.

Why: with durable Postgres (fsync on) every autocommit INSERT waits for its own WAL flush, and each
statement and Redis round trip costs CPU in this process. A new task is accepted like a producer
with ``linger.ms``: requests arriving within ``accept_linger_ms`` (or until ``accept_batch_max``)
are written by one multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` and their ids by one
pipelined ``XADD`` (+ the in-flight marks), so one commit and one round trip serve the whole group.

What does not change:

* **No 202 before the commit.** A request's future resolves only after the INSERT returned (the
  connection is in autocommit: returned means committed). If the INSERT fails, every request of
  the group gets the exception and answers 503; none is acknowledged.
* **XADD after the commit, failures tolerated.** A failed pipeline or a crash between commit and
  XADD leaves committed rows without a stream entry; the sweeper (``service.queue.sweep``)
  re-enqueues them, exactly as for a single request.
* **Conflicts keep their meaning.** A row that did not insert (idempotency key already used, or an
  identical task in flight, possibly from the same group) is answered by the per-request path
  (:meth:`Database.insert_task`), which finds the task to join or replay.
* **Order.** Within a process, entries are appended in the order the requests were accepted.
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


class GroupCommitter:
    """Collects new tasks for up to ``linger_s`` (or ``max_batch``) and writes each group at once."""

    def __init__(self, db: Database, queue: TaskQueue, *, linger_s: float, max_batch: int, inflight_ttl_s: int) -> None:
        self.db = db
        self.queue = queue
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.inflight_ttl_s = inflight_ttl_s
        self._pending: list[tuple[NewTask, asyncio.Future[bool]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, task: NewTask) -> bool:
        """True once the task's row is committed (and its XADD attempted); False if it conflicted and
        must take the per-request path. Raises what the INSERT raised (the caller answers 503)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending.append((task, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger_s, self._flush)
        # shield: a cancelled request must not cancel the group's write (the row may commit anyway)
        return await asyncio.shield(future)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group, self._pending = self._pending, []
        if group:
            flush = asyncio.create_task(self._write(group))
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)

    async def _write(self, group: list[tuple[NewTask, asyncio.Future[bool]]]) -> None:
        tasks = [t for t, _ in group]
        with contextlib.suppress(Exception):
            metrics.ACCEPT_GROUP_SIZE.observe(len(tasks))
        try:
            created = await self.db.insert_tasks(tasks)
        except BaseException as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        new = [t for t in tasks if t.task_id in created]
        if new:  # never raises: a failure is healed by the sweeper
            await self.queue.enqueue_group([(t.task_id, t.inflight_key) for t in new], self.inflight_ttl_s)
        for task, future in group:
            if not future.done():
                future.set_result(task.task_id in created)

    async def aclose(self) -> None:
        """Write what is pending and wait for every write in progress (drain on shutdown)."""
        self._flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
