"""The API's one middleware, pure ASGI (``BaseHTTPMiddleware`` costs too much per request).

For every request: admission control (503 + Retry-After instead of queueing seconds of latency: above
``max_inflight`` in flight per process; above ``overload_slow_inflight`` while served requests are
slow; for a request that already waited ``overload_queue_ms`` for its first loop turn; and for a
share of new requests while the event loop lags, see :class:`OverloadShedder`), the body limit
(``Content-Length`` and streamed bodies → 413), the body deadline (a body not received within
``body_timeout_s`` → 408 and the connection closed, so a chunked body without end or a stalled upload
cannot hold an admission slot) and HTTP metrics labelled by route *template* (bounded label sets). It
also serves well-formed ``POST /task`` requests itself through the route's own handler: FastAPI's
per-request machinery profiled at over half the CPU of a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
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
LATENCY_ALPHA = 0.02  # weight of one served request in the moving average (about the last 50)
QUEUED_AT = "loadproof.queued_at"  # scope key: perf_counter() when the server made the request's task
LANE_EXCLUDED_HEADERS = frozenset({b"idempotency-key", b"expect", b"transfer-encoding"})
SHED_BODY = b'{"detail":"server overloaded; retry shortly"}'
SHED_HEADERS = [
    (b"content-type", JSON.encode()),
    (b"content-length", str(len(SHED_BODY)).encode()),
    (b"retry-after", RETRY_AFTER_S.encode()),
]


# This process's guard (the last one built: one app per server process), for the fast lane of
# service/orchestrator.py's protocol; None before the app is built or in-process.
LANE: list[Guard | None] = [None]


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class OverloadShedder:
    """Sheds a share of new requests while the event loop lags *and* served requests miss their budget.

    A process short of CPU runs every ready callback late: a request waits for loop turns, each of its
    awaits costs one, and latency grows while the number in flight stays below ``max_inflight``. The
    lag signal (as Node's toobusy): a coroutine sleeps ``interval / 10`` and measures how late it wakes.
    The rule, judged once per window (``overload_interval_ms``, default 100 ms):

    * the share **grows** (by ``STEP``, up to ``MAX_GAIN`` times more the further the lag is above its
      target, capped at ``MAX_SHARE``) only when all three hold: the window's *smallest* lag is above
      ``overload_lag_ms`` (default 10; CoDel's rule: one stall, a GC pause or a neighbour's time slice,
      never counts); at least ``MIN_INFLIGHT`` requests are in flight (a lag that comes from outside
      cannot be cured by refusing work); and the p95 of the requests served in the window, from their
      receipt to their answer, is above ``overload_latency_ms`` (default 100: the stack sets a quarter of
      the p95 objective), or nothing was served in it at all;
    * otherwise it **falls** by ``STEP_DOWN`` = ``STEP`` / 4, about 7 s from the cap to 0: a share that
      fell as fast as it rose let the next surge in at once and oscillated.

    The latency gate is what makes a refusal answer to the objective: a loop that lags under a step of
    load but still answers in a fraction of the budget refuses no one. ``overload_latency_ms`` 0 turns
    the gate off (lag alone decides); ``overload_lag_ms`` 0 turns the shedder off. Measurements behind
    the defaults: docs/service.md, *Sustained overload*.
    """

    STEP = 0.05
    STEP_DOWN = STEP / 4
    MAX_GAIN = 4.0
    MAX_SHARE = 0.9
    MIN_INFLIGHT = 16
    MAX_SAMPLES = 4096  # served latencies kept per window: a bound, far above one window's requests

    def __init__(
        self,
        lag_ms: float,
        interval_ms: float,
        inflight: Callable[[], int],
        enabled_metrics: bool = True,
        latency_ms: float = 0.0,
    ) -> None:
        """``inflight``: the requests admitted and not yet answered in this process."""
        self.inflight = inflight
        self.target_s = lag_ms / 1000.0
        self.interval_s = interval_ms / 1000.0
        self.sample_s = self.interval_s / 10
        self.latency_target_s = latency_ms / 1000.0
        self.share = 0.0
        self.lag_s = 0.0
        self.served_p95_s: float | None = None
        self.enabled_metrics = enabled_metrics
        self._served: list[float] = []

    @property
    def enabled(self) -> bool:
        return self.target_s > 0

    def shed(self) -> bool:
        """Whether to refuse this request (the caller exempts probes); one compare when not lagging."""
        return self.share > 0.0 and random.random() < self.share

    def served(self, seconds: float) -> None:
        """One request answered (not refused) this window, ``seconds`` after its receipt."""
        if self.latency_target_s > 0 and len(self._served) < self.MAX_SAMPLES:
            self._served.append(seconds)

    def _slow(self) -> bool:
        """Whether this window's served p95 missed the latency gate (always, with the gate off)."""
        served, self._served = self._served, []
        if self.latency_target_s <= 0:
            return True
        if not served:
            self.served_p95_s = None
            return True  # work in flight and none of it answered in a whole window
        served.sort()
        self.served_p95_s = served[min(len(served) - 1, math.ceil(0.95 * len(served)) - 1)]
        return self.served_p95_s > self.latency_target_s

    def window(self, min_lag_s: float, inflight: int) -> None:
        """One window's verdict: its smallest lag, the work in flight and the served p95 move the share."""
        self.lag_s = min_lag_s
        slow = self._slow()
        if min_lag_s > self.target_s and inflight >= self.MIN_INFLIGHT and slow:
            self.share = min(self.MAX_SHARE, self.share + self.STEP * min(self.MAX_GAIN, min_lag_s / self.target_s))
        else:
            self.share = max(0.0, self.share - self.STEP_DOWN)
        if self.enabled_metrics:
            with contextlib.suppress(Exception):
                metrics.HTTP_LOOP_LAG.set(min_lag_s)
                metrics.HTTP_SHED_SHARE.set(self.share)

    async def run(self) -> None:
        """Sample the loop's lag and judge each window, forever (cancelled at shutdown)."""
        started = time.perf_counter()
        smallest = math.inf
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.sample_s)
            now = time.perf_counter()
            smallest = min(smallest, max(0.0, now - t0 - self.sample_s))
            if now - started >= self.interval_s:
                self.window(smallest, self.inflight())
                started, smallest = now, math.inf


class Guard:
    """Admission control, body limit and HTTP metrics for every request, in one pure-ASGI layer."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        routes: Sequence[Any],
        fast_task: FastTask,
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        """``routes``: the app's routes (to label requests refused before routing); ``fast_task``: the
        ``POST /task`` handler for a validated body without ``Idempotency-Key`` (the route's own);
        ``on_shed``: told of every request refused for overload (the workers' pressure signal)."""
        self.app = app
        self.on_shed = on_shed
        self.routes = list(routes)
        self.fast_task = fast_task
        self.inflight = 0
        self.max_inflight = settings.max_inflight
        self.slow_inflight = settings.overload_slow_inflight or settings.max_inflight
        self.slow_s = settings.overload_slow_ms / 1000.0
        self.latency_s = 0.0  # moving average of served requests' server-side latency
        self.max_body = settings.max_body_bytes
        self.body_timeout_s = settings.body_timeout_s
        self.max_queue_s = settings.overload_queue_ms / 1000.0 if settings.overload_queue_ms > 0 else math.inf
        self.enabled = settings.metrics_enabled
        self.overload = OverloadShedder(
            settings.overload_lag_ms,
            settings.overload_interval_ms,
            lambda: self.inflight,
            settings.metrics_enabled,
            latency_ms=settings.overload_latency_ms,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._templates: dict[tuple[str, str], str] = {}
        self.task_route = next(
            (r for r in self.routes if getattr(r, "path", None) == "/task" and "POST" in getattr(r, "methods", ())),
            None,
        )
        LANE[0] = self  # the server protocol's fast lane serves through this process's guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.overload.enabled:
                await self._with_overload_monitor(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        status = 500
        if path not in EXEMPT_PATHS:
            reason = self._shed_reason(scope, started)
            if reason is not None:
                await self._shed(scope, send, reason, started)
                return
        self.inflight += 1
        _gauge_inc()
        try:
            try:
                receive, too_large = await self._limit_body(scope, receive)
            except TimeoutError:
                count_rejected("body_timeout")
                status = 408
                await self._reply(send, 408, f"request body not received within {self.body_timeout_s:g}s")
                return
            if too_large:
                count_rejected("too_large")
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

    def _shed_reason(self, scope: Scope, started: float) -> str | None:
        """Why this request is refused, or None: too many in flight, too long a wait for its first loop
        turn (stamped by the server's protocol, absent in-process), or the lag shedder's share.

        "Too many" is Little's law: what is in flight waits about in-flight / throughput. ``max_inflight``
        (256) leaves room for the bursts of the demo's 1000 requests/s on one process, but in sustained
        overload it queued a second or more. The lower ``overload_slow_inflight``, when set, applies
        only while the served requests' moving average latency exceeds ``overload_slow_ms``, so a burst
        of fast requests is still admitted; it is off by default because on this 2-core box the demo's
        peak is slow too (measurements: docs/service.md, *Sustained overload*).
        """
        if self.inflight >= self.max_inflight or (self.inflight >= self.slow_inflight and self.latency_s > self.slow_s):
            return "overload"
        if started - scope.get(QUEUED_AT, started) > self.max_queue_s:
            return "queue_wait"
        if self.overload.shed():
            return "loop_lag"
        return None

    async def _with_overload_monitor(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The lifespan, with the overload monitor running for as long as the server does (one per
        process; an app driven without lifespan, as in-process tests do, never sheds on it)."""
        monitor = asyncio.get_running_loop().create_task(self.overload.run(), name="loadproof-overload")
        try:
            await self.app(scope, receive, send)
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor

    async def _shed(self, scope: Scope, send: Send, reason: str, started: float) -> None:
        """503 + Retry-After as cheaply as it can be: before the body is read, constant bytes, no JSON
        work, since a shed request's CPU is taken from the requests being served."""
        count_rejected(reason)
        if self.on_shed is not None and scope.get("method") == "POST":
            # new work the API cannot take; not polls, which wait for the very tasks the workers
            # would hold back (still not enough: see docs/service.md, *Sustained overload*)
            with contextlib.suppress(Exception):
                self.on_shed()
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": 503, "headers": SHED_HEADERS})
            await send({"type": "http.response.body", "body": SHED_BODY})
        self._observe(scope, 503, started)

    def takes(self, scope: Scope) -> bool:
        """Whether the server protocol's fast lane may serve this request (see :meth:`serve_body`):
        ``POST /task`` with a JSON body, no ``Idempotency-Key``, nothing but a plain complete body."""
        if self.task_route is None or scope["method"] != "POST" or scope["path"] != "/task":
            return False
        is_json = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                is_json = _is_json(value)
            elif name in LANE_EXCLUDED_HEADERS:
                return False
        return is_json

    async def serve_body(self, scope: Scope, body: bytes, send: Send) -> bool:
        """``POST /task`` whose whole body the server already holds, answered without the ASGI stack
        (uvicorn's app task, this middleware's body replay, Starlette's response objects: a third
        of a cache hit's CPU in a profile). The same admission, handler and metrics as
        :meth:`__call__`. False, with nothing sent, when the request must take the ASGI path (too
        large, not a valid task): its error answers stay FastAPI's."""
        started = time.perf_counter()
        if len(body) > self.max_body:
            return False
        reason = self._shed_reason(scope, started)
        if reason is not None:
            await self._shed(scope, send, reason, started)
            return True
        try:
            task = TaskIn.model_validate_json(body)
        except ValidationError:
            return False
        scope["route"] = self.task_route
        status = 500
        self.inflight += 1
        _gauge_inc()
        try:
            response = await self.fast_task(task)
            status = response.status_code
            await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
        finally:
            self.inflight -= 1
            _gauge_dec()
            self._observe(scope, status, started)
        return True

    async def _fast_task(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """``POST /task`` without FastAPI's per-request machinery, which profiled at more than half of
        the CPU of a request. Only a JSON body that validates and has no ``Idempotency-Key`` takes this
        path, through the same model and the same handler as the route; anything else (every error
        case included) is handed to FastAPI with the body replayed, so answers are identical.
        Returns None when handled, else the ``receive`` to pass on."""
        is_json = keyed = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                is_json = _is_json(value)
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
    async def _reply(send: Send, status: int, detail: str) -> None:
        body = json_bytes({"detail": detail})
        headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        if status in (408, 413):
            headers.append((b"connection", b"close"))  # the unread body makes the connection unusable
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    def _template(self, scope: Scope) -> str:
        """The matched route's template; for a request refused before routing (413/503), match it now
        (remembered for paths without parameters: a shed ``POST /task`` costs no route matching)."""
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path", None) or "other"
        key = (scope["path"], scope["method"])
        template = self._templates.get(key)
        if template is not None:
            return template
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                route = candidate
                break
        template = getattr(route, "path", None) or "other"
        if template == scope["path"] and len(self._templates) < 64:  # bounded: paths are client-controlled
            self._templates[key] = template
        return template

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        now = time.perf_counter()
        elapsed = now - started
        if status < 500:  # answered, not refused: the lag shedder's latency gate
            self.overload.served(now - scope.get(QUEUED_AT, started))
        if status < 400 and self.slow_inflight < self.max_inflight:  # only when the lower limit is on
            self.latency_s += LATENCY_ALPHA * (elapsed - self.latency_s)
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
            pair[0].observe(elapsed)
            pair[1].inc()
        except Exception:  # a metrics failure never fails a request
            log.debug("http metrics failed", exc_info=True)


_REJECTED: dict[str, Any] = {}


def count_rejected(reason: str) -> None:
    """One refusal, by reason (``metrics.REJECT_REASONS``); a metrics failure never fails the request."""
    with contextlib.suppress(Exception):
        child = _REJECTED.get(reason)
        if child is None:
            child = _REJECTED[reason] = metrics.HTTP_REJECTED.labels(reason)
        child.inc()


def _is_json(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def _gauge_inc() -> None:
    with contextlib.suppress(Exception):
        metrics.HTTP_INFLIGHT.inc()


def _gauge_dec() -> None:
    with contextlib.suppress(Exception):
        metrics.HTTP_INFLIGHT.dec()
