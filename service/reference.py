"""The bare reference endpoints for ``make bench``: the least a ``POST /task`` can do on each path.

* ``get`` (the hot path's floor): exactly one Redis GET per request.
* ``insert`` (the cold path's floor): exactly one Postgres INSERT (autocommit, so one commit and its
  WAL flush) and one Redis XADD per request, with no grouping: the naive durable accept.

``make bench`` reports the service's highest sustainable arrival rate *relative to* this app run
with the same uvicorn settings on the same machine, so the ratio says how much of the machine's
capacity the real request path (validation, cache, coalescing, database, queue) costs; the absolute
rate mostly says how fast this machine is. It is a raw ASGI app (no framework) on purpose: it is
the floor, not a competitor.

Run: ``LOADPROOF_REDIS_URL=redis://127.0.0.1:6379/0 [LOADPROOF_REFERENCE_MODE=insert
LOADPROOF_DATABASE_URL=postgresql://...] python -m service.reference``.
"""

from __future__ import annotations

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

REDIS_KEY = "loadproof:reference"
REFERENCE_STREAM = "loadproof:reference-tasks"
REFERENCE_TABLE = (
    "CREATE TABLE IF NOT EXISTS reference_tasks (id uuid PRIMARY KEY, status text NOT NULL, "
    "accepted_at timestamptz NOT NULL DEFAULT now())"
)
_JSON = [(b"content-type", b"application/json")]


class ReferenceApp:
    """ASGI app: ``POST /task`` reads its body, GETs one Redis key and answers 200; ``/healthz`` 200."""

    def __init__(
        self, redis_url: str, pool_size: int = 64, *, mode: str = "get", database_url: str = "", db_pool_size: int = 20
    ) -> None:
        if mode not in ("get", "insert"):
            raise ValueError(f"reference mode must be get or insert, not {mode!r}")
        self._redis_url = redis_url
        self._pool_size = pool_size
        self._redis: aioredis.Redis | None = None
        self.mode = mode
        self._database_url = database_url
        self._db_pool_size = db_pool_size  # the service's db_pool_size: the same number of connections
        self._pg: AsyncConnectionPool | None = None

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
            try:
                if self.mode == "insert":
                    task_id = await self._insert_and_xadd()
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

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.mode == "insert":
                    self._pg = AsyncConnectionPool(
                        self._database_url,
                        min_size=self._pool_size,
                        max_size=self._pool_size,
                        open=False,
                        kwargs={"autocommit": True},
                    )
                    await self._pg.open(wait=True)
                    async with self._pg.connection() as conn:
                        await conn.execute(REFERENCE_TABLE)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._pg is not None:
                    await self._pg.close()
                if self._redis is not None:
                    await self._redis.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


app = ReferenceApp(
    os.environ.get("LOADPROOF_REDIS_URL", "redis://127.0.0.1:6379/0"),
    int(os.environ.get("LOADPROOF_DB_POOL_SIZE", "20"))
    if os.environ.get("LOADPROOF_REFERENCE_MODE") == "insert"
    else 64,
    mode=os.environ.get("LOADPROOF_REFERENCE_MODE", "get"),
    database_url=os.environ.get("LOADPROOF_DATABASE_URL", ""),
    db_pool_size=int(os.environ.get("LOADPROOF_DB_POOL_SIZE", "20")),
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
