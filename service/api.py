"""The orchestrator's HTTP API (FastAPI): accept tasks, serve cached posts, report task state.

Hot path (a cache hit) = request parsing + one Redis GET + sending pre-rendered bytes: no Postgres,
no JSON encoding, no response-model validation (routes return ``Response`` objects; the models in
``service.schemas`` still document every status in OpenAPI).

One pure-ASGI middleware (:class:`service.guard.Guard`) does admission control, the body limit and
HTTP metrics, and serves well-formed ``POST /task`` requests through the same handler as the FastAPI
route, which still documents it and answers every error case.

An identical request whose task is still in flight is joined through Redis alone (one ``MGET``
looks up the post and the in-flight task id), so hot keys do not reach Postgres while their post is
written; Postgres' unique index on unfinished tasks remains the race-free guard behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import types
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from service import metrics
from service.accept import GroupCommitter, NewTask
from service.cache import INFLIGHT_TTL_S, Cache, clean_topic, inflight_key, make_redis
from service.config import Settings, get_settings
from service.db import Database, TaskStoreBusy
from service.guard import JSON, RETRY_AFTER_S, Guard, count_rejected, json_bytes
from service.pressure import PressureSignal
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


_ACCEPTED = metrics.TASKS.labels("accepted")
_COALESCED = metrics.TASKS.labels("coalesced")
QUEUE_WRITE_TIMEOUT_S = 2.0


@dataclass
class Runtime:
    """Per-process state shared by the routes and the middleware."""

    settings: Settings
    db: Database | None = None
    cache: Cache | None = None
    queue: TaskQueue | None = None
    accept: GroupCommitter | None = None  # group commit of new tasks (None: one INSERT per request)
    pressure: PressureSignal | None = None  # tells the workers to yield while this process sheds
    draining: bool = False


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


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes({"detail": detail}), status_code=status, media_type=JSON, headers=headers)


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
        rt.pressure = PressureSignal(s, rt.cache.client)
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
                max_writes=s.accept_max_writes,
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

    async def fast_task(task: TaskIn) -> Response:
        try:
            return await create_task_response(rt, task, None)
        except (SQLAlchemyError, psycopg.OperationalError, TaskStoreBusy) as exc:
            return _db_unavailable_response(exc)

    def on_shed() -> None:
        if rt.pressure is not None:
            rt.pressure.shed()

    app.add_middleware(
        Guard, settings=rt.settings, routes=list(app.router.routes), fast_task=fast_task, on_shed=on_shed
    )
    return app


async def _db_unavailable(request: Request, exc: Exception) -> Response:
    return _db_unavailable_response(exc)


def _db_unavailable_response(exc: Exception) -> Response:
    log.warning("database unavailable: %r", exc)
    count_rejected("store")
    return _error(503, "task store unavailable; retry shortly", {"Retry-After": RETRY_AFTER_S})


async def _invalid_request(request: Request, exc: Exception) -> Response:
    """422 with FastAPI's error list, made encodable: the echoed ``input`` may hold what the client
    sent and UTF-8 cannot carry (a lone surrogate from a ``\\ud800`` escape, undecodable bytes), and
    FastAPI's own handler would fail encoding it (a 500 for bad client input)."""
    assert isinstance(exc, RequestValidationError)
    try:
        detail = jsonable_encoder(_encodable(exc.errors()))
    except RecursionError:  # an echoed input nested too deeply to encode: answer without the inputs
        detail = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in exc.errors()]
        detail = jsonable_encoder(_encodable(detail))
    return JSONResponse({"detail": detail}, status_code=422)


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
        return Response(json_bytes({"status": "queued", "task_id": joined}), status_code=202, media_type=JSON)
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
            json_bytes({"status": "done", "task_id": task_id, "post": post, "cached": True}), media_type=JSON
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
        accepted = await rt.accept.submit(new)  # committed with its group, XADD attempted
        if accepted is not None:
            _inc(_ACCEPTED if accepted.created else _COALESCED)
            body_out = {"status": accepted.status, "task_id": accepted.task_id}
            return Response(json_bytes(body_out), status_code=202, media_type=JSON)
        # it conflicted otherwise: find the task to join or replay, one request at a time
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
    return Response(json_bytes({"status": "queued", "task_id": task_id}), status_code=202, media_type=JSON)


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
        return Response(json_bytes(body), media_type=JSON)
    return Response(json_bytes({"status": row["status"], "task_id": row["id"]}), status_code=202, media_type=JSON)


def _inc(counter: Any) -> None:
    with contextlib.suppress(Exception):
        counter.inc()
