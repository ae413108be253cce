"""The task store's side of a run: rows accepted in the window by status, and the bounded drain.

The rows are the truth the counters are checked against: a task the API counted as accepted
without a row is lost, a row still queued after the drain is pending (not lost).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskRows:
    """Task rows counted in Postgres for the run, by status."""

    total: int
    by_status: dict[str, int] = field(default_factory=dict)


# The task table's status words (service/db.py: queued|running|done|failed).
DONE_STATUSES = ("done",)
FAILED_STATUSES = ("failed",)


def psycopg_url(database_url: str) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://``) -> libpq URL."""
    scheme, sep, rest = database_url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def count_task_rows(database_url: str, since: float, until: float, *, table: str = "tasks") -> TaskRows:
    """Task rows accepted in ``[since, until]``, by status (psycopg 3, read-only).

    Rows stored straight from the cache (``cached``: keyed requests answered 200) were never
    accepted as work, so they are not counted against ``tasks_accepted``.
    """
    import psycopg  # local: the report Job may run without a database
    from psycopg import sql as psql

    query = psql.SQL(
        "SELECT status::text, count(*) FROM {} "
        "WHERE accepted_at >= to_timestamp(%s) AND accepted_at <= to_timestamp(%s) AND NOT cached GROUP BY 1"
    ).format(psql.Identifier(table))
    with psycopg.connect(psycopg_url(database_url), connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(query, (since, until))
        by_status = {str(status): int(n) for status, n in cur.fetchall()}
    return TaskRows(total=sum(by_status.values()), by_status=by_status)


def pending_rows(rows: TaskRows) -> int:
    return sum(n for s, n in rows.by_status.items() if s not in DONE_STATUSES + FAILED_STATUSES)


def wait_for_drain(
    database_url: str,
    since: float,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    on_poll: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Wait (bounded) until no task row created since ``since`` is still queued/running.

    Returns ``(drained_at, still_pending)``; a timeout is not an error, the pending count is reported.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        pending = pending_rows(count_task_rows(database_url, since, time.time() + 60))
        if on_poll is not None:
            on_poll(pending)
        if pending == 0 or time.monotonic() >= deadline:
            return time.time(), pending
        time.sleep(poll_s)


# ---------------------------------------------------------------- the measurement
