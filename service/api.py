"""The orchestrator's HTTP API (FastAPI): accept tasks, serve cached posts, report task state.

Hot path (a cache hit) = request parsing + one Redis GET + sending pre-rendered bytes: no Postgres,
no JSON encoding, no response-model validation (routes return ``Response`` objects; the models in
``service.schemas`` still document every status in OpenAPI).

One pure-ASGI middleware (:class:`Guard`; ``BaseHTTPMiddleware`` costs too much per request) does
admission control (``max_inflight`` → 503 + Retry-After), the body limit (``Content-Length`` and
streamed bodies → 413) and HTTP metrics labelled by route *template*. It also serves well-formed
``POST /task`` requests itself (same model, same handler as the FastAPI route, which still documents
it and answers every error case): FastAPI's per-request machinery profiled at over half the CPU.

An identical request whose task is still in flight is joined through Redis alone (one ``MGET``
looks up the post and the in-flight task id), so hot keys do not reach Postgres while their post is
written; Postgres' unique index on unfinished tasks remains the race-free guard behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg
from fastapi import FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service import metrics
from service.accept import GroupCommitter, NewTask
from service.cache import INFLIGHT_TTL_S, Cache, clean_topic, inflight_key, make_redis
from service.config import Settings, get_settings
from service.db import Database, TaskStoreBusy
from service.queue import TaskQueue
from service.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    ErrorOut,
    HealthOut,
    TaskAccepted,
    TaskDone,
    TaskIn,
    TaskView,
    Timings,
    Usage,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = "application/json"
_ACCEPTED = metrics.TASKS.labels("accepted")
_COALESCED = metrics.TASKS.labels("coalesced")
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes are never shed
RETRY_AFTER_S = "1"
QUEUE_WRITE_TIMEOUT_S = 2.0


@dataclass
class Runtime:
    """Per-process state shared by the routes and the middleware."""

    settings: Settings
    db: Database | None = None
    cache: Cache | None = None
    queue: TaskQueue | None = None
    accept: GroupCommitter | None = None  # group commit of new tasks (None: one INSERT per request)
    draining: bool = False
    inflight: int = 0
    routes: list[Any] = field(default_factory=list)  # the app's routes, to label requests refused before routing


_RUNTIME: Runtime | None = None


def install_drain_signals(delay_s: float) -> None:
    """Wrap the server's SIGTERM/SIGINT handlers: flip readiness to 503 first, pass the signal on later.

    Called during lifespan startup, after uvicorn installed its handlers (it uses ``signal.signal``),
    so this works the same with one process and under uvicorn's multiprocess supervisor. A second
    signal is passed on at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: types.FrameType | None, _previous: Any = previous) -> None:
            if _RUNTIME is not None and not _RUNTIME.draining:
                begin_drain()
                log.warning("signal %d: readiness now 503, stopping in %.1fs", signum, delay_s)
                timer = threading.Timer(delay_s, _previous, args=(signum, frame))
                timer.daemon = True
                timer.start()
            else:
                _previous(signum, frame)

        signal.signal(sig, handler)


def begin_drain() -> None:
    """Readiness goes 503 now; requests are still served until the server stops listening."""
    if _RUNTIME is not None:
        _RUNTIME.draining = True


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(_json_bytes({"detail": detail}), status_code=status, media_type=JSON, headers=headers)


# --- middleware -------------------------------------------------------------------------------
class Guard:
    """Admission control, body limit and HTTP metrics for every request, in one pure-ASGI layer."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime
        self.max_inflight = runtime.settings.max_inflight
        self.max_body = runtime.settings.max_body_bytes
        self.enabled = runtime.settings.metrics_enabled
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.task_route = next(
            (r for r in runtime.routes if getattr(r, "path", None) == "/task" and "POST" in getattr(r, "methods", ())),
            None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rt = self.rt
        path: str = scope["path"]
        status = 500
        if rt.inflight >= self.max_inflight and path not in EXEMPT_PATHS:
            _count_rejected("overload")
            await self._reply(send, 503, "server overloaded; retry shortly", retry_after=True)
            self._observe(scope, 503, started)
            return
        rt.inflight += 1
        _gauge_inc()
        try:
            receive, too_large = await self._limit_body(scope, receive)
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
            rt.inflight -= 1
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
        try:
            response = await create_task_response(self.rt, task, None)
        except (SQLAlchemyError, psycopg.OperationalError, TaskStoreBusy) as exc:
            response = _db_unavailable_response(exc)
        await response(scope, replay_receive, send)
        return None

    async def _limit_body(self, scope: Scope, receive: Receive) -> tuple[Receive, bool]:
        """(receive to pass on, too large?). A declared length is checked at once; otherwise the body is
        read here up to the limit and replayed, so a chunked upload cannot exceed it either."""
        declared: int | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return receive, True  # unparseable length: refuse rather than trust it
                break
        if declared is not None:
            if declared > self.max_body:
                return receive, True
            return receive, False
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive, False
        chunks: list[bytes] = []
        size = 0
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
        body = _json_bytes({"detail": detail})
        headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
        if retry_after:
            headers.append((b"retry-after", RETRY_AFTER_S.encode()))
        if status == 413:
            headers.append((b"connection", b"close"))  # the unread body makes the connection unusable
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    def _template(self, scope: Scope) -> str:
        """The matched route's template; for a request refused before routing (413/503), match it now."""
        route = scope.get("route")
        if route is None:
            for candidate in self.rt.routes:
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


# --- app ----------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, *, drain_delay_s: float | None = None) -> FastAPI:
    """The app factory (``uvicorn --factory service.api:create_app``); see ``service.orchestrator``."""
    global _RUNTIME
    rt = Runtime(settings or get_settings())
    _RUNTIME = rt

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = rt.settings
        rt.db = Database(s)
        rt.cache = Cache(s, make_redis(s, socket_timeout=s.redis_socket_timeout_s))
        # The queue write gets its own pool and more patience than a cache read: under a burst, a
        # missed XADD is not lost (the sweeper re-enqueues) but delays the task by the sweep grace.
        rt.queue = TaskQueue(s, make_redis(s, socket_timeout=QUEUE_WRITE_TIMEOUT_S))
        await rt.db.wait_and_create_schema()
        with contextlib.suppress(Exception):  # Redis may be down at start: tasks are still accepted
            await rt.queue.ensure_group()
        if s.accept_group_commit:
            rt.accept = GroupCommitter(
                rt.db,
                rt.queue,
                linger_s=s.accept_linger_ms / 1000.0,
                max_batch=s.accept_batch_max,
                inflight_ttl_s=INFLIGHT_TTL_S,
            )
        if drain_delay_s is not None:
            install_drain_signals(drain_delay_s)
        try:
            yield
        finally:
            if rt.accept is not None:
                await rt.accept.aclose()  # what is gathered is still written and answered
            await rt.cache.aclose()
            with contextlib.suppress(Exception):
                await rt.queue.client.aclose()
            await rt.db.aclose()
            _mark_dead()

    app = FastAPI(
        title="loadproof orchestrator",
        version="1.0.0",
        summary="Accepts post-generation tasks, serves cached posts, queues the rest for the batched LLM workers.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    app.add_exception_handler(SQLAlchemyError, _db_unavailable)
    app.add_exception_handler(psycopg.OperationalError, _db_unavailable)
    app.add_exception_handler(TaskStoreBusy, _db_unavailable)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    _routes(app, rt)
    rt.routes = list(app.router.routes)
    app.add_middleware(Guard, runtime=rt)
    return app


async def _db_unavailable(request: Request, exc: Exception) -> Response:
    return _db_unavailable_response(exc)


def _db_unavailable_response(exc: Exception) -> Response:
    log.warning("database unavailable: %r", exc)
    return _error(503, "task store unavailable; retry shortly", {"Retry-After": RETRY_AFTER_S})


async def _invalid_request(request: Request, exc: Exception) -> Response:
    """422 with FastAPI's error list, made encodable: the echoed ``input`` may hold what the client
    sent and UTF-8 cannot carry (a lone surrogate from a ``\\ud800`` escape, undecodable bytes), and
    FastAPI's own handler would fail encoding it (a 500 for bad client input)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": jsonable_encoder(_encodable(exc.errors()))}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI answers a body it cannot decode (not UTF-8, nested too deeply for ``json.loads``) with
    400, which the spec does not list. It is malformed JSON like any other, so it gets the same
    answer as a syntax error: 422 ``json_invalid`` at ``body``. Other HTTP errors pass unchanged."""
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and cause is not None and not isinstance(cause, HTTPException):
        reason = "not UTF-8" if isinstance(cause, UnicodeDecodeError) else type(cause).__name__
        error = {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error", "input": {}}
        return JSONResponse({"detail": [{**error, "ctx": {"error": reason}}]}, status_code=422)
    return await http_exception_handler(request, exc)


def _encodable(value: Any) -> Any:
    """``value`` with every string UTF-8-encodable and bytes decoded (invalid parts backslash-escaped)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


ERR = {"model": ErrorOut}


def _routes(app: FastAPI, rt: Runtime) -> None:
    @app.post(
        "/task",
        status_code=202,
        response_model=None,
        responses={
            200: {"model": TaskDone, "description": "A post already exists (cache hit, or the task is done)."},
            202: {"model": TaskAccepted, "description": "Stored durably and queued (or joined an identical task)."},
            409: {**ERR, "description": "Idempotency-Key reused with a different persona/topic."},
            413: {**ERR, "description": "Body larger than max_body_bytes."},
            503: {**ERR, "description": "Overloaded or task store unavailable; see Retry-After."},
        },
        summary="Request a post for a persona and topic",
    )
    async def create_task(
        body: TaskIn,
        idempotency_key: Annotated[
            str | None,
            Header(
                min_length=1,
                max_length=200,
                pattern=IDEMPOTENCY_KEY_PATTERN,
                description="Same key, same task: 1-200 printable ASCII characters, no leading/trailing space.",
            ),
        ] = None,
    ) -> Response:
        return await create_task_response(rt, body, idempotency_key)

    @app.get(
        "/task/{task_id}",
        response_model=TaskView,
        responses={404: {**ERR, "description": "No such task."}, 503: {**ERR, "description": "Task store down."}},
        summary="State, post, usage and timings of a task",
    )
    async def get_task(task_id: uuid.UUID) -> Response | TaskView:
        assert rt.db is not None
        row = await rt.db.get_task(str(task_id))
        if row is None:
            return _error(404, f"task {task_id} not found")
        accepted, finished = row["accepted_at"], row["finished_at"]
        return TaskView(
            task_id=uuid.UUID(row["id"]),
            status=row["status"],
            persona_id=row["persona_id"],
            topic=row["topic"],
            post=row["post"],
            cached=row["cached"],
            usage=Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"], cost_usd=row["cost_usd"]),
            timings=Timings(
                accepted_at=accepted,
                started_at=row["started_at"],
                finished_at=finished,
                completion_s=(finished - accepted).total_seconds() if finished is not None else None,
            ),
            attempts=row["attempts"],
            error=row["error"],
        )

    @app.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers")
    async def healthz() -> HealthOut:
        return HealthOut(status="ok")

    @app.get(
        "/readyz",
        response_model=HealthOut,
        responses={503: {"model": HealthOut, "description": "Draining or the task store is unreachable."}},
        summary="Readiness: Postgres reachable and not draining",
    )
    async def readyz() -> Response | HealthOut:
        """Ready = not draining and Postgres answers. Redis is reported but optional: with Redis down,
        tasks are still accepted durably in Postgres (the sweeper enqueues them later), so pulling every
        API pod out of service on a Redis outage would turn a degraded system into a full outage."""
        checks: dict[str, str] = {}
        ok = not rt.draining
        if rt.draining:
            checks["draining"] = "true"
        try:
            assert rt.db is not None
            await asyncio.wait_for(rt.db.ping(), 2.0)
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {type(exc).__name__}"
            ok = False
        try:
            assert rt.cache is not None
            await asyncio.wait_for(rt.cache.client.ping(), 1.0)  # type: ignore[misc]
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"degraded: {type(exc).__name__}"
        out = HealthOut(status="ok" if ok else "unavailable", checks=checks)
        if ok:
            return out
        return JSONResponse(out.model_dump(), status_code=503, headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics of this process (or all, multiprocess)")
    async def metrics_endpoint() -> Response:
        if not rt.settings.metrics_enabled:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)


async def create_task_response(rt: Runtime, body: TaskIn, idempotency_key: str | None) -> Response:
    """``POST /task`` itself, shared by the FastAPI route and the middleware's fast path."""
    assert rt.db is not None and rt.cache is not None and rt.queue is not None
    cache, db = rt.cache, rt.db
    key = cache.key(body.persona_id, body.topic)
    if idempotency_key is not None:
        existing = await db.find_by_idempotency_key(idempotency_key)
        if existing is not None:
            return _existing(existing, key)
    coalesce = rt.settings.coalesce_enabled
    hit, joined = await cache.lookup(key, coalesce=coalesce and idempotency_key is None)
    if joined is not None and hit is None:  # identical task in flight: Redis alone answers
        _inc(_COALESCED)
        return Response(_json_bytes({"status": "queued", "task_id": joined}), status_code=202, media_type=JSON)
    if hit is not None:
        Cache.delivered(hit)
        if idempotency_key is None:
            return Response(hit.body, media_type=JSON)
        post = hit.post()
        task_id, existing = await db.insert_done_from_cache(
            str(uuid.uuid4()),
            body.persona_id,
            clean_topic(body.topic),
            key,
            idempotency_key,
            post,
            hit.output_tokens,
        )
        if existing is not None:
            return _existing(existing, key)
        return Response(
            _json_bytes({"status": "done", "task_id": task_id, "post": post, "cached": True}), media_type=JSON
        )
    task_id, topic = str(uuid.uuid4()), clean_topic(body.topic)
    if rt.accept is not None:
        new = NewTask(
            task_id,
            body.persona_id,
            topic,
            key,
            key if coalesce else None,
            idempotency_key,
            inflight_key(key) if coalesce else None,
        )
        if await rt.accept.submit(new):  # committed with its group, XADD attempted
            _inc(_ACCEPTED)
            return Response(_json_bytes({"status": "queued", "task_id": task_id}), status_code=202, media_type=JSON)
        # it conflicted: find the task to join or replay, one request at a time
    task_id, created, existing = await db.insert_task(
        task_id, body.persona_id, topic, key, key if coalesce else None, idempotency_key
    )
    if created:
        _inc(_ACCEPTED)
        # XADD (+ the in-flight mark) in one round trip; a failure is tolerated: the row is
        # durable and the sweeper re-enqueues it.
        await rt.queue.enqueue(task_id, inflight_key(key) if coalesce else None, INFLIGHT_TTL_S)
    elif existing is not None:
        if existing.get("cache_key") == key and existing.get("status") in ("queued", "running"):
            _inc(_COALESCED)
            if coalesce:
                await cache.mark_inflight(key, str(existing["id"]))
        return _existing(existing, key)
    return Response(_json_bytes({"status": "queued", "task_id": task_id}), status_code=202, media_type=JSON)


def render_metrics() -> bytes:
    """This process's registry, or every process's values in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def _mark_dead() -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


def _existing(row: dict[str, Any], key: str) -> Response:
    """Answer for a request that maps to an existing task (idempotent replay or coalesced)."""
    if row.get("cache_key") != key:
        return _error(409, "Idempotency-Key was already used for a different persona_id/topic")
    if row["status"] == "done" and row.get("post") is not None:
        body = {"status": "done", "task_id": row["id"], "post": row["post"], "cached": bool(row.get("cached"))}
        return Response(_json_bytes(body), media_type=JSON)
    return Response(_json_bytes({"status": row["status"], "task_id": row["id"]}), status_code=202, media_type=JSON)


def _inc(counter: Any) -> None:
    with contextlib.suppress(Exception):
        counter.inc()
