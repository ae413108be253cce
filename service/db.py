"""The task store: one Postgres table, reached through a SQLAlchemy 2 async engine (psycopg 3).

Why Core SQL and not the ORM: every statement here is on a hot path, is one round trip and is
easier to reason about (idempotent ``UPDATE ... WHERE status <> 'done'``) as plain SQL.

Pooling is the knob the baseline turns off: ``db_pool_mode=queue`` keeps ``db_pool_size`` (+ overflow)
connections per process; ``null`` opens a connection per use. Pool gauges come from pool events and
the acquire-wait histogram from timing :meth:`Database.connect`, so the dashboard shows pool pressure.

The row is the source of truth for a task (see ``service.queue``). Two partial indexes carry the
design: a UNIQUE index on ``coalesce_key`` over unfinished rows makes request coalescing race-free,
and an index on unfinished rows keeps the queue sweeper's scan cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import event, text
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from service import metrics
from service.config import Settings

log = logging.getLogger(__name__)

SCHEMA_LOCK_ID = 0x10AD9800F  # advisory lock: concurrent processes create the schema one at a time
UNFINISHED = ("queued", "running")
ATTEMPTS = 5  # insert-or-join rounds before giving up (see Database.insert_task)


class NewTaskRow(Protocol):
    """What a grouped insert needs of each task (``service.accept.NewTask``)."""

    @property
    def task_id(self) -> str: ...
    @property
    def persona_id(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def cache_key(self) -> str: ...
    @property
    def coalesce_key(self) -> str | None: ...
    @property
    def idempotency_key(self) -> str | None: ...


class TaskStoreBusy(Exception):
    """The task store could not settle a request in time (contention); the API answers 503."""


SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS tasks (
        id              uuid PRIMARY KEY,
        persona_id      text NOT NULL,
        topic           text NOT NULL,
        cache_key       text NOT NULL,
        coalesce_key    text,
        idempotency_key text UNIQUE,
        status          text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
        cached          boolean NOT NULL DEFAULT false,
        post            text,
        input_tokens    integer,
        output_tokens   integer,
        cost_usd        double precision,
        attempts        integer NOT NULL DEFAULT 0,
        error           text,
        accepted_at     timestamptz NOT NULL DEFAULT now(),
        started_at      timestamptz,
        finished_at     timestamptz
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_inflight_coalesce ON tasks (coalesce_key) "
    "WHERE status IN ('queued', 'running')",
    "CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (accepted_at) WHERE status IN ('queued', 'running')",
)


def make_engine(settings: Settings) -> AsyncEngine:
    """An async engine configured from settings, with pool metrics attached."""
    url = settings.database_url.get_secret_value()
    kwargs: dict[str, Any] = {}
    if settings.db_pool_mode == "null":
        kwargs["poolclass"] = NullPool
    else:
        kwargs.update(
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_s,
            pool_recycle=settings.db_pool_recycle_s,
        )
    engine = create_async_engine(url, connect_args={"connect_timeout": 5}, isolation_level="AUTOCOMMIT", **kwargs)
    _attach_pool_metrics(engine)
    if settings.db_pool_pre_ping:
        event.listen(engine.sync_engine.pool, "checkout", _check_alive)
    return engine


def _check_alive(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """The pre-ping, without its round trip: a pooled connection is handed out only if its socket is open
    and has nothing to read.

    SQLAlchemy's ``pool_pre_ping`` sends a statement on every checkout, so every statement cost two
    round trips, and on a busy machine each round trip waits for a Postgres backend to be scheduled.
    An idle connection in autocommit mode is sent nothing by a healthy server; a server that went
    away (restart, ``pg_terminate_backend``, fast shutdown) sends its FATAL message and closes, so
    the socket turns readable. Raising ``DisconnectionError`` makes the pool discard the connection
    and hand out a new one (the same recovery as the pre-ping).
    """
    conn = getattr(dbapi_connection, "driver_connection", None)
    if conn is None:
        return
    if conn.closed or conn.broken:
        raise DisconnectionError("connection closed")
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error) as exc:
        raise DisconnectionError(f"connection unusable: {exc!r}") from exc
    if readable:
        raise DisconnectionError("the server sent something to an idle connection (it closed it)")


def _attach_pool_metrics(engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool
    overflow = getattr(pool, "overflow", None)

    def on_checkout(*_: Any) -> None:
        with contextlib.suppress(Exception):
            metrics.DB_POOL_IN_USE.inc()
            if overflow is not None:
                metrics.DB_POOL_OVERFLOW.set(max(0, overflow()))

    def on_checkin(*_: Any) -> None:
        with contextlib.suppress(Exception):
            metrics.DB_POOL_IN_USE.dec()
            if overflow is not None:
                metrics.DB_POOL_OVERFLOW.set(max(0, overflow()))

    event.listen(pool, "checkout", on_checkout)
    event.listen(pool, "checkin", on_checkin)


class Database:
    """The engine plus the few statements the service needs."""

    def __init__(self, settings: Settings, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings)

    async def aclose(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def connect(self, *, transaction: bool = False) -> AsyncIterator[AsyncConnection]:
        """A pooled connection; acquire wait is measured.

        Every statement of the service is atomic on its own, so by default a connection runs in
        autocommit mode: one round trip per statement instead of BEGIN + statement + COMMIT.
        ``transaction=True`` gives a real transaction (committed on success), e.g. to hold an
        advisory lock for its duration.
        """
        started = time.perf_counter()
        with contextlib.suppress(Exception):
            metrics.DB_POOL_WAITERS.inc()
        waiting = True
        try:
            async with self.engine.connect() as conn:
                waiting = False
                with contextlib.suppress(Exception):
                    metrics.DB_POOL_WAITERS.dec()
                    metrics.DB_POOL_WAIT.observe(time.perf_counter() - started)
                if transaction:
                    await conn.execution_options(isolation_level="READ COMMITTED")
                    async with conn.begin():
                        yield conn
                else:
                    yield conn
        finally:
            if waiting:
                with contextlib.suppress(Exception):
                    metrics.DB_POOL_WAITERS.dec()

    async def create_schema(self) -> None:
        """Idempotent; safe when several processes start at once (advisory lock)."""
        async with self.connect(transaction=True) as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK_ID})
            for statement in SCHEMA:
                await conn.execute(text(statement))

    async def wait_and_create_schema(self, within_s: float = 60.0) -> None:
        """``create_schema``, retried while Postgres is still starting (pods start in any order)."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                await self.create_schema()
                return
            except (OSError, SQLAlchemyError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("task store not reachable yet (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def ping(self) -> None:
        async with self.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def _rows(self, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run one statement on the pooled connection's psycopg driver directly.

        The pool, its events and metrics are SQLAlchemy's; the statement skips SQLAlchemy's execution
        layer, which measured at about half of the CPU per statement on the hot path (~450 -> ~250 us
        per insert). A connection that broke mid-statement is invalidated, not returned to the pool.
        """
        async with self.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            try:
                async with driver.cursor(row_factory=dict_row) as cur:
                    await cur.execute(sql, params)
                    return list(await cur.fetchall()) if cur.description is not None else []
            except psycopg.OperationalError:
                await conn.invalidate()
                raise

    # --- API side ---------------------------------------------------------------------------
    async def insert_task(
        self,
        task_id: str,
        persona_id: str,
        topic: str,
        cache_key: str,
        coalesce_key: str | None,
        idempotency_key: str | None,
    ) -> tuple[str, bool, dict[str, Any] | None]:
        """Insert a queued task, or find the one this request must join.

        Returns ``(task_id, created, existing_row)``. A conflict on the idempotency key returns that
        task whatever its state; a conflict on the in-flight coalesce key returns the unfinished task.
        If the conflicting task finishes between the insert and the lookup, the insert is retried.
        """
        params = {
            "id": task_id,
            "persona_id": persona_id,
            "topic": topic,
            "cache_key": cache_key,
            "coalesce_key": coalesce_key,
            "idem": idempotency_key,
        }
        for _ in range(ATTEMPTS):
            if await self._rows(
                "INSERT INTO tasks (id, persona_id, topic, cache_key, coalesce_key, idempotency_key, status) "
                "VALUES (%(id)s, %(persona_id)s, %(topic)s, %(cache_key)s, %(coalesce_key)s, %(idem)s, 'queued') "
                "ON CONFLICT DO NOTHING RETURNING id",
                params,
            ):
                return task_id, True, None
            existing = await self._rows(
                "SELECT id::text AS id, status, post, cache_key, cached FROM tasks "
                "WHERE (idempotency_key = %(idem)s) "
                "OR (coalesce_key = %(coalesce_key)s AND status IN ('queued', 'running')) "
                "ORDER BY (idempotency_key IS NOT DISTINCT FROM %(idem)s) DESC LIMIT 1",
                params,
            )
            if existing:
                return str(existing[0]["id"]), False, existing[0]
        # Each round lost a race: the conflicting task finished between our INSERT and SELECT. Only a
        # saturated process is that slow between two statements; answer as overloaded, not as a bug.
        raise TaskStoreBusy(f"identical task kept finishing while this one was being accepted ({ATTEMPTS} rounds)")

    async def insert_tasks(self, tasks: Sequence[NewTaskRow]) -> set[str]:
        """Insert a group of queued tasks in one statement (one commit); returns the ids that were
        inserted. A row that conflicts (idempotency key used, identical task in flight — also within
        the group) is skipped, not an error: its caller takes the per-request path."""
        if not tasks:
            return set()
        rows = await self._rows(
            "INSERT INTO tasks (id, persona_id, topic, cache_key, coalesce_key, idempotency_key, status) "
            "SELECT id, persona_id, topic, cache_key, coalesce_key, idempotency_key, 'queued' FROM unnest("
            "%(ids)s::uuid[], %(personas)s::text[], %(topics)s::text[], %(keys)s::text[], "
            "%(coalesce)s::text[], %(idem)s::text[]) "
            "AS t(id, persona_id, topic, cache_key, coalesce_key, idempotency_key) "
            "ON CONFLICT DO NOTHING RETURNING id::text AS id",
            {
                "ids": [t.task_id for t in tasks],
                "personas": [t.persona_id for t in tasks],
                "topics": [t.topic for t in tasks],
                "keys": [t.cache_key for t in tasks],
                "coalesce": [t.coalesce_key for t in tasks],
                "idem": [t.idempotency_key for t in tasks],
            },
        )
        return {str(r["id"]) for r in rows}

    async def unfinished_by_coalesce_key(self, keys: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{coalesce_key: (task id, status)}`` of the queued or running tasks holding these keys."""
        rows = await self._rows(
            "SELECT coalesce_key, id::text AS id, status FROM tasks "
            "WHERE coalesce_key = ANY(%(keys)s::text[]) AND status IN ('queued', 'running')",
            {"keys": list(keys)},
        )
        return {str(r["coalesce_key"]): (str(r["id"]), str(r["status"])) for r in rows}

    async def insert_done_from_cache(
        self, task_id: str, persona_id: str, topic: str, cache_key: str, idempotency_key: str, post: str, tokens: int
    ) -> tuple[str, dict[str, Any] | None]:
        """A keyed request served from the cache still gets a durable row, so the key maps to one task id."""
        inserted = await self._rows(
            "INSERT INTO tasks (id, persona_id, topic, cache_key, idempotency_key, status, cached, post, "
            "input_tokens, output_tokens, cost_usd, started_at, finished_at) "
            "VALUES (%(id)s, %(persona_id)s, %(topic)s, %(cache_key)s, %(idem)s, 'done', true, %(post)s, 0, "
            "%(tokens)s, 0, now(), now()) ON CONFLICT DO NOTHING RETURNING id",
            {
                "id": task_id,
                "persona_id": persona_id,
                "topic": topic,
                "cache_key": cache_key,
                "idem": idempotency_key,
                "post": post,
                "tokens": tokens,
            },
        )
        if inserted:
            return task_id, None
        existing = await self.find_by_idempotency_key(idempotency_key)
        if existing is None:
            raise RuntimeError("idempotency key conflict without a row")
        return str(existing["id"]), existing

    async def find_by_idempotency_key(self, key: str) -> dict[str, Any] | None:
        rows = await self._rows(
            "SELECT id::text AS id, status, post, cache_key, cached FROM tasks WHERE idempotency_key = %(k)s",
            {"k": key},
        )
        return rows[0] if rows else None

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        rows = await self._rows(
            "SELECT id::text AS id, persona_id, topic, status, cached, post, input_tokens, output_tokens, "
            "cost_usd, attempts, error, accepted_at, started_at, finished_at FROM tasks WHERE id = %(id)s",
            {"id": task_id},
        )
        return rows[0] if rows else None

    # --- worker side --------------------------------------------------------------------------
    async def claim(self, task_ids: list[str]) -> list[dict[str, Any]]:
        """Mark unfinished tasks running and count the delivery; finished or unknown ids are not returned."""
        if not task_ids:
            return []
        return await self._rows(
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, now()) "
            "WHERE id = ANY(CAST(%(ids)s AS uuid[])) AND status IN ('queued', 'running') "
            "RETURNING id::text AS id, persona_id, topic, cache_key, attempts",
            {"ids": task_ids},
        )

    async def claim_queued(self, limit: int) -> list[dict[str, Any]]:
        """Claim the oldest queued tasks straight from Postgres (``FOR UPDATE SKIP LOCKED``).

        The workers' lane while Redis cannot deliver: the rows are the queue of record, so tasks
        accepted during an outage are worked on then instead of piling up for the sweeper to hand
        over all at once when Redis returns. Concurrent workers skip each other's rows.
        """
        return await self._rows(
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, now()) "
            "WHERE id IN (SELECT id FROM tasks WHERE status = 'queued' ORDER BY accepted_at LIMIT %(n)s "
            "FOR UPDATE SKIP LOCKED) AND status = 'queued' "
            "RETURNING id::text AS id, persona_id, topic, cache_key, attempts",
            {"n": limit},
        )

    async def complete(
        self, results: list[tuple[str, str, int | None, int | None, float | None]]
    ) -> list[dict[str, Any]]:
        """Store posts ``(id, post, input_tokens, output_tokens, cost_usd)``; idempotent.

        A task already done is neither overwritten nor returned, so callers count each completion once.
        Returns the rows actually completed with their completion time in seconds. Usage may be None
        (a streamed post is stored before its call's usage is known; see :meth:`record_usage`).
        """
        if not results:
            return []
        ids, posts, tin, tout, cost = (list(col) for col in zip(*results, strict=True))
        return await self._rows(
            "UPDATE tasks AS t SET status = 'done', post = v.post, input_tokens = v.tin, output_tokens = v.tout, "
            "cost_usd = v.cost, error = NULL, finished_at = now() "
            "FROM unnest(CAST(%(ids)s AS uuid[]), CAST(%(posts)s AS text[]), CAST(%(tin)s AS integer[]), "
            "CAST(%(tout)s AS integer[]), CAST(%(cost)s AS double precision[])) AS v(id, post, tin, tout, cost) "
            "WHERE t.id = v.id AND t.status <> 'done' "
            "RETURNING t.id::text AS id, t.cache_key, t.output_tokens, "
            "EXTRACT(EPOCH FROM (t.finished_at - t.accepted_at))::float8 AS completion_s",
            {"ids": ids, "posts": posts, "tin": tin, "tout": tout, "cost": cost},
        )

    async def record_usage(self, usage: list[tuple[str, int, int, float]]) -> list[dict[str, Any]]:
        """Each task's share ``(id, input_tokens, output_tokens, cost_usd)`` of its LLM call, once known.

        A streamed post is stored (and served) the moment it closes, but the call's usage arrives with
        its last chunk; this writes the billed share then, once: a task already billed is left alone.
        Returns the rows billed now.
        """
        if not usage:
            return []
        ids, tin, tout, cost = (list(col) for col in zip(*usage, strict=True))
        return await self._rows(
            "UPDATE tasks AS t SET input_tokens = v.tin, output_tokens = v.tout, cost_usd = v.cost "
            "FROM unnest(CAST(%(ids)s AS uuid[]), CAST(%(tin)s AS integer[]), CAST(%(tout)s AS integer[]), "
            "CAST(%(cost)s AS double precision[])) AS v(id, tin, tout, cost) "
            "WHERE t.id = v.id AND t.status = 'done' AND t.cost_usd IS NULL "
            "RETURNING t.id::text AS id, t.output_tokens",
            {"ids": ids, "tin": tin, "tout": tout, "cost": cost},
        )

    async def requeue(self, task_id: str, reason: str, *, refund_attempt: bool = False) -> bool:
        """Back to queued after a retryable failure (the caller re-enqueues it).

        ``refund_attempt`` gives the delivery back (the LLM was never tried, e.g. its breaker was open).
        """
        rows = await self._rows(
            "UPDATE tasks SET status = 'queued', error = %(e)s, "
            "attempts = CASE WHEN %(refund)s THEN GREATEST(attempts - 1, 0) ELSE attempts END "
            "WHERE id = %(id)s AND status = 'running' RETURNING id",
            {"id": task_id, "e": reason[:1000], "refund": refund_attempt},
        )
        return bool(rows)

    async def fail(self, task_id: str, reason: str) -> bool:
        """Dead-letter: status ``failed`` with the reason; never overrides a stored post."""
        rows = await self._rows(
            "UPDATE tasks SET status = 'failed', error = %(e)s, finished_at = now() "
            "WHERE id = %(id)s AND status IN ('queued', 'running') RETURNING id",
            {"id": task_id, "e": reason[:1000]},
        )
        return bool(rows)

    async def try_lock(self, conn: AsyncConnection, lock_id: int) -> bool:
        """Transaction-scoped advisory lock, e.g. so only one worker sweeps at a time."""
        return bool((await conn.execute(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": lock_id})).scalar())
