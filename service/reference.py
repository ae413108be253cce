"""The bare reference endpoints for ``make bench``: the least a ``POST /task`` can do on each path.

Each mode answers ``POST /task`` (after reading its body) by one rule:

* ``constant`` (the hot path's ceiling): a constant 202 JSON body, no I/O at all: what the server
  (uvicorn, the event loop, HTTP parsing) costs by itself on this machine.
* ``get`` (the hot path, naive): exactly one Redis GET per request, answered 200.
* ``insert`` (the cold path, naive): exactly one Postgres INSERT (autocommit, so one commit and its
  WAL flush) and one Redis XADD per request, with no grouping: the naive durable accept.
* ``group`` (the cold path's limit): group commit. New tasks arriving while a group is being written
  go together in the next group; an idle process waits at most ``linger_ms`` for company, and a group
  holds at most ``batch_max`` tasks. A group is one multi-row INSERT (one transaction, one commit)
  and then one pipeline of XADDs, one per row, sent while the next group's INSERT is in flight (one
  INSERT in flight per process, entries in commit order); each request is answered 202 with its task
  id only after its group committed and its XADD was sent, so it is as durable as ``insert`` and
  amortised like the service's own accept path. A failed INSERT or XADD answers every request of its
  group 503; none is acknowledged.

``make bench`` reports the service's highest sustainable arrival rate *relative to* these apps run
with the same uvicorn settings (and the service's database pool size) on the same machine, so each
ratio says how much of the machine's capacity the real request path (validation, cache, coalescing,
database, queue) costs; the absolute rate mostly says how fast this machine is. It is a raw ASGI app
(no framework) written directly against redis-py and psycopg_pool on purpose: it is the floor, not a
competitor, and shares no code with the service.

Run: ``LOADPROOF_REFERENCE_MODE=constant|get|insert|group [LOADPROOF_REDIS_URL=redis://127.0.0.1:6379/0]
[LOADPROOF_DATABASE_URL=postgresql://... LOADPROOF_DB_POOL_SIZE=20] [LOADPROOF_ACCEPT_LINGER_MS=2
LOADPROOF_ACCEPT_BATCH_MAX=256] python -m service.reference`` (defaults shown; the last two are the
service's own knobs of the same name, read by ``group`` only).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODES = ("constant", "get", "insert", "group")
DURABLE_MODES = ("insert", "group")  # the modes that write Postgres (and XADD)
REDIS_MODES = ("get", "insert", "group")
REDIS_KEY = "loadproof:reference"
REFERENCE_STREAM = "loadproof:reference-tasks"
REFERENCE_TABLE = (
    "CREATE TABLE IF NOT EXISTS reference_tasks (id uuid PRIMARY KEY, status text NOT NULL, "
    "accepted_at timestamptz NOT NULL DEFAULT now())"
)
CONSTANT_BODY = b'{"status":"queued","task_id":"00000000-0000-0000-0000-000000000000"}'
_JSON = [(b"content-type", b"application/json")]


class ReferenceApp:
    """ASGI app: ``POST /task`` answers by its ``mode``'s rule (see the module docstring); ``/healthz`` 200.

    ``pool_size``: Redis connections; ``db_pool_size``: Postgres connections (the service's); ``linger_s``
    and ``batch_max``: the ``group`` mode's longest wait for company when idle and largest group.
    """

    def __init__(
        self,
        redis_url: str,
        pool_size: int = 64,
        *,
        mode: str = "get",
        database_url: str = "",
        db_pool_size: int = 20,
        linger_s: float = 0.002,
        batch_max: int = 256,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"reference mode must be one of {', '.join(MODES)}, not {mode!r}")
        self._redis_url = redis_url
        self._pool_size = pool_size
        self._redis: aioredis.Redis | None = None
        self.mode = mode
        self._database_url = database_url
        self._db_pool_size = db_pool_size  # the service's db_pool_size: the same number of connections
        self._pg: AsyncConnectionPool | None = None
        self._group = GroupCommit(self, linger_s, batch_max)

    def _client(self) -> aioredis.Redis:
        # Created lazily inside the worker's event loop (uvicorn may fork after import).
        if self._redis is None:
            pool = aioredis.BlockingConnectionPool.from_url(self._redis_url, max_connections=self._pool_size, timeout=5)
            self._redis = aioredis.Redis(connection_pool=pool)
        return self._redis

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            await _respond(send, 200, b'{"status":"ok"}')
        elif path == "/task" and method == "POST":
            more = True
            while more:  # drain the body like a real handler would
                message = await receive()
                more = message.get("more_body", False)
            if self.mode == "constant":
                await _respond(send, 202, CONSTANT_BODY)
                return
            try:
                if self.mode in DURABLE_MODES:
                    task_id = await (self._group.submit() if self.mode == "group" else self._insert_and_xadd())
                    await _respond(send, 202, json.dumps({"status": "queued", "task_id": task_id}).encode())
                    return
                value = await self._client().get(REDIS_KEY)
            except Exception as exc:  # surface trouble as a 503, never a hang
                await _respond(send, 503, json.dumps({"detail": f"{type(exc).__name__}: {exc}"}).encode())
                return
            await _respond(send, 200, json.dumps({"cached": value is not None}).encode())
        else:
            await _respond(send, 404, b'{"detail":"not found"}')

    async def _insert_and_xadd(self) -> str:
        """One row committed, then its id appended to a stream: the naive durable accept."""
        assert self._pg is not None
        task_id = str(uuid.uuid4())
        async with self._pg.connection() as conn:
            await conn.execute(
                "INSERT INTO reference_tasks (id, status) VALUES (%s, 'queued')", (task_id,), prepare=True
            )
        await self._client().xadd(REFERENCE_STREAM, {b"task_id": task_id.encode()})
        return task_id

    async def insert_group(self, task_ids: list[str]) -> None:
        """The rows of one group in one multi-row INSERT: one transaction, one commit (autocommit)."""
        assert self._pg is not None
        async with self._pg.connection() as conn:
            await conn.execute(
                "INSERT INTO reference_tasks (id, status) SELECT unnest(%s::uuid[]), 'queued'",
                (task_ids,),
                prepare=True,
            )

    async def xadd_group(self, task_ids: list[str]) -> None:
        """One stream entry per row of a committed group, in one pipeline (one round trip)."""
        pipe = self._client().pipeline(transaction=False)
        for task_id in task_ids:
            pipe.xadd(REFERENCE_STREAM, {b"task_id": task_id.encode()})
        await pipe.execute()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.mode in DURABLE_MODES:
                    self._pg = AsyncConnectionPool(
                        self._database_url,
                        min_size=self._db_pool_size,
                        max_size=self._db_pool_size,
                        open=False,
                        kwargs={"autocommit": True},
                    )
                    await self._pg.open(wait=True)
                    async with self._pg.connection() as conn:
                        await conn.execute(REFERENCE_TABLE)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._group.aclose()
                if self._pg is not None:
                    await self._pg.close()
                if self._redis is not None:
                    await self._redis.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class GroupCommit:
    """The ``group`` mode's rule: one INSERT in flight per process; the tasks that arrive meanwhile form
    the next group (at most ``batch_max``); an idle process lingers ``linger_s`` for company. A committed
    group's XADDs run while the next group's INSERT is in flight, in commit order (each pipeline waits
    for the previous one), and its requests are answered when its pipeline was sent."""

    def __init__(self, app: ReferenceApp, linger_s: float, batch_max: int) -> None:
        self._app = app
        self.linger_s = linger_s
        self.batch_max = max(1, batch_max)
        self._pending: list[tuple[str, asyncio.Future[str]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None
        self._last_xadd: asyncio.Task[None] | None = None

    async def submit(self) -> str:
        """A new task's id once its group committed and its XADD was sent; raises what either raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((str(uuid.uuid4()), future))
        if self._writer is None:  # else the running writer takes it with the next group
            if len(self._pending) >= self.batch_max:
                self._start()
            elif self._timer is None:
                self._timer = loop.call_later(self.linger_s, self._start)
        return await asyncio.shield(future)  # a cancelled request must not cancel its group's write

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is None and self._pending:
            self._writer = asyncio.get_running_loop().create_task(self._write_all())

    async def _write_all(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending[: self.batch_max], self._pending[self.batch_max :]
                try:
                    await self._app.insert_group([task_id for task_id, _ in group])
                except Exception as exc:  # the whole group answers 503: none was acknowledged
                    _answer(group, exc)
                    continue
                previous = self._last_xadd
                self._last_xadd = asyncio.get_running_loop().create_task(self._xadd_and_answer(group, previous))
        finally:
            self._writer = None

    async def _xadd_and_answer(
        self, group: list[tuple[str, asyncio.Future[str]]], previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # commit order in the stream; its outcome is its own group's
        try:
            await self._app.xadd_group([task_id for task_id, _ in group])
        except Exception as exc:  # committed, but not queued: not acknowledged either
            _answer(group, exc)
            return
        _answer(group, None)

    async def aclose(self) -> None:
        """Write what is pending and wait for the writes in progress (drain on shutdown)."""
        self._start()
        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._last_xadd is not None:
            await asyncio.wait([self._last_xadd])


def _answer(group: list[tuple[str, asyncio.Future[str]]], error: Exception | None) -> None:
    """Each request of a group gets its task id, or ``error`` (answered 503)."""
    for task_id, future in group:
        if not future.done():
            if error is None:
                future.set_result(task_id)
            else:
                future.set_exception(error)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


app = ReferenceApp(
    os.environ.get("LOADPROOF_REDIS_URL", "redis://127.0.0.1:6379/0"),
    int(os.environ.get("LOADPROOF_DB_POOL_SIZE", "20"))
    if os.environ.get("LOADPROOF_REFERENCE_MODE") in DURABLE_MODES
    else 64,
    mode=os.environ.get("LOADPROOF_REFERENCE_MODE", "get"),
    database_url=os.environ.get("LOADPROOF_DATABASE_URL", ""),
    db_pool_size=int(os.environ.get("LOADPROOF_DB_POOL_SIZE", "20")),
    linger_s=float(os.environ.get("LOADPROOF_ACCEPT_LINGER_MS", "2")) / 1000,
    batch_max=int(os.environ.get("LOADPROOF_ACCEPT_BATCH_MAX", "256")),
)


def uvicorn_options(processes: int) -> dict[str, Any]:
    """The uvicorn settings bench compares under; the orchestrator's own, when it exports them.

    ``service.orchestrator.uvicorn_options(processes)`` is preferred so the two servers cannot
    drift; otherwise the settings the service documents (uvloop, httptools, no access log).
    """
    import importlib

    try:
        orchestrator = importlib.import_module("service.orchestrator")
    except ImportError:
        orchestrator = None
    options: Any = getattr(orchestrator, "uvicorn_options", None)
    if callable(options):
        return cast(dict[str, Any], options(processes))
    # Mirrors service/orchestrator.py main(): uvloop, httptools, no access log, same backlog/keep-alive.
    return {
        "workers": processes,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "log_level": "warning",
        "backlog": 4096,
        "timeout_keep_alive": 75,
    }


def main() -> None:
    """``python -m service.reference``: host/port/processes from ``LOADPROOF_HOST/PORT/PROCESSES``."""
    import uvicorn

    host = os.environ.get("LOADPROOF_HOST", "127.0.0.1")
    port = int(os.environ.get("LOADPROOF_PORT", "8081"))
    processes = int(os.environ.get("LOADPROOF_PROCESSES", "1"))
    uvicorn.run("service.reference:app", host=host, port=port, **uvicorn_options(processes))


if __name__ == "__main__":
    main()
