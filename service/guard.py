"""The API's one middleware, pure ASGI (``BaseHTTPMiddleware`` costs too much per request).

For every request: admission control (``max_inflight`` in flight per process, then 503 + Retry-After
instead of queueing seconds of latency), the body limit (``Content-Length`` and streamed bodies →
413), the body deadline (a body not received within ``body_timeout_s`` → 408 and the connection
closed, so a chunked body without end or a stalled upload cannot hold an admission slot) and HTTP
metrics labelled by route *template* (bounded label sets). It also serves well-formed
``POST /task`` requests itself through the route's own handler: FastAPI's per-request machinery
profiled at over half the CPU of a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi.responses import Response
from pydantic import ValidationError
from starlette.routing import Match

from service import metrics
from service.config import Settings
from service.schemas import TaskIn

log = logging.getLogger("service.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
FastTask = Callable[[TaskIn], Awaitable[Response]]

JSON = "application/json"
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes are never shed
RETRY_AFTER_S = "1"


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class Guard:
    """Admission control, body limit and HTTP metrics for every request, in one pure-ASGI layer."""

    def __init__(self, app: ASGIApp, settings: Settings, routes: Sequence[Any], fast_task: FastTask) -> None:
        """``routes``: the app's routes (to label requests refused before routing); ``fast_task``: the
        ``POST /task`` handler for a validated body without ``Idempotency-Key`` (the route's own)."""
        self.app = app
        self.routes = list(routes)
        self.fast_task = fast_task
        self.inflight = 0
        self.max_inflight = settings.max_inflight
        self.max_body = settings.max_body_bytes
        self.body_timeout_s = settings.body_timeout_s
        self.enabled = settings.metrics_enabled
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.task_route = next(
            (r for r in self.routes if getattr(r, "path", None) == "/task" and "POST" in getattr(r, "methods", ())),
            None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        status = 500
        if self.inflight >= self.max_inflight and path not in EXEMPT_PATHS:
            _count_rejected("overload")
            await self._reply(send, 503, "server overloaded; retry shortly", retry_after=True)
            self._observe(scope, 503, started)
            return
        self.inflight += 1
        _gauge_inc()
        try:
            try:
                receive, too_large = await self._limit_body(scope, receive)
            except TimeoutError:
                _count_rejected("body_timeout")
                status = 408
                await self._reply(send, 408, f"request body not received within {self.body_timeout_s:g}s")
                return
            if too_large:
                _count_rejected("too_large")
                status = 413
                await self._reply(send, 413, f"request body larger than {self.max_body} bytes")
                return

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            if path == "/task" and scope["method"] == "POST" and self.task_route is not None:
                fallthrough = await self._fast_task(scope, receive, send_wrapper)
                if fallthrough is None:
                    return
                receive = fallthrough
            await self.app(scope, receive, send_wrapper)
        finally:
            self.inflight -= 1
            _gauge_dec()
            self._observe(scope, status, started)

    async def _fast_task(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """``POST /task`` without FastAPI's per-request machinery, which profiled at more than half of
        the CPU of a request. Only a JSON body that validates and has no ``Idempotency-Key`` takes this
        path, through the same model and the same handler as the route; anything else (every error
        case included) is handed to FastAPI with the body replayed, so answers are identical.
        Returns None when handled, else the ``receive`` to pass on."""
        is_json = keyed = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                is_json = value.split(b";", 1)[0].strip().lower() == b"application/json"
            elif name == b"idempotency-key":
                keyed = True
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> Message:
            return replay.pop() if replay else await receive()

        if not is_json or keyed:
            return replay_receive
        try:
            task = TaskIn.model_validate_json(replay[0]["body"])
        except ValidationError:
            return replay_receive
        scope["route"] = self.task_route  # the metrics label, as if routed
        response = await self.fast_task(task)
        await response(scope, replay_receive, send)
        return None

    async def _limit_body(self, scope: Scope, receive: Receive) -> tuple[Receive, bool]:
        """(receive to pass on, too large?). A declared length is checked at once; then the body is read
        here, up to the limit and within ``body_timeout_s`` (``TimeoutError`` otherwise), and replayed,
        so neither a chunked upload nor a stalled one can exceed either bound."""
        declared: int | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return receive, True  # unparseable length: refuse rather than trust it
                break
        if declared is not None and declared > self.max_body:
            return receive, True
        if declared is None and scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive, False
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return receive, True
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> Message:
            return replay.pop() if replay else await receive()

        return replay_receive, False

    @staticmethod
    async def _reply(send: Send, status: int, detail: str, retry_after: bool = False) -> None:
        body = json_bytes({"detail": detail})
        headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        if retry_after:
            headers.append((b"retry-after", RETRY_AFTER_S.encode()))
        if status in (408, 413):
            headers.append((b"connection", b"close"))  # the unread body makes the connection unusable
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    def _template(self, scope: Scope) -> str:
        """The matched route's template; for a request refused before routing (413/503), match it now."""
        route = scope.get("route")
        if route is None:
            for candidate in self.routes:
                match, _ = candidate.matches(scope)
                if match != Match.NONE:
                    route = candidate
                    break
        return getattr(route, "path", None) or "other"

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        if not self.enabled:
            return
        try:
            template = self._template(scope)
            key = (template, scope["method"], status)
            pair = self._children.get(key)
            if pair is None:
                labels = (template, scope["method"], str(status))
                pair = (metrics.HTTP_REQUEST_DURATION.labels(*labels), metrics.HTTP_REQUESTS.labels(*labels))
                if len(self._children) < 1000:  # bounded: methods/status codes are client-controlled
                    self._children[key] = pair
            pair[0].observe(time.perf_counter() - started)
            pair[1].inc()
        except Exception:  # a metrics failure never fails a request
            log.debug("http metrics failed", exc_info=True)


def _count_rejected(reason: str) -> None:
    with contextlib.suppress(Exception):
        metrics.HTTP_REJECTED.labels(reason).inc()


def _gauge_inc() -> None:
    with contextlib.suppress(Exception):
        metrics.HTTP_INFLIGHT.inc()


def _gauge_dec() -> None:
    with contextlib.suppress(Exception):
        metrics.HTTP_INFLIGHT.dec()
