"""The bare reference endpoint for ``make bench``: ``POST /task`` doing exactly one Redis GET.

``make bench`` reports the service's highest sustainable arrival rate *relative to* this app run
with the same uvicorn settings on the same machine, so the ratio says how much of the machine's
capacity the real request path (validation, cache, coalescing, database, queue) costs; the absolute
rate mostly says how fast this machine is. It is a raw ASGI app (no framework) on purpose: it is
the floor, not a competitor.

Run: ``LOADPROOF_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn service.reference:app``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import redis.asyncio as aioredis

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REDIS_KEY = "loadproof:reference"
_JSON = [(b"content-type", b"application/json")]


class ReferenceApp:
    """ASGI app: ``POST /task`` reads its body, GETs one Redis key and answers 200; ``/healthz`` 200."""

    def __init__(self, redis_url: str, pool_size: int = 64) -> None:
        self._redis_url = redis_url
        self._pool_size = pool_size
        self._redis: aioredis.Redis | None = None

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
                value = await self._client().get(REDIS_KEY)
            except Exception as exc:  # surface Redis trouble as a 503, never a hang
                await _respond(send, 503, json.dumps({"detail": f"redis: {exc}"}).encode())
                return
            await _respond(send, 200, json.dumps({"cached": value is not None}).encode())
        else:
            await _respond(send, 404, b'{"detail":"not found"}')

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._redis is not None:
                    await self._redis.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})


app = ReferenceApp(os.environ.get("LOADPROOF_REDIS_URL", "redis://127.0.0.1:6379/0"))


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
