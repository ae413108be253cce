"""The task store's pool against a real Postgres: connections the server dropped are never handed out."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from localstack.servers import PostgresServer, RedisServer
from localstack.services import SimulatorServer
from service.db import Database
from tests.conftest import make_settings

pytestmark = pytest.mark.usefixtures("clean_state")


async def _backend_pids(db: Database, n: int) -> set[int]:
    """``n`` statements at once, so the pool holds ``n`` connections; their server pids."""
    rows = await asyncio.gather(*(db._rows("SELECT pg_backend_pid() AS pid, pg_sleep(0.05)", {}) for _ in range(n)))
    return {int(r[0]["pid"]) for r in rows}


@pytest.mark.parametrize("pre_ping", [True, False])
async def test_connections_the_server_dropped_are_replaced_at_checkout(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, pre_ping: bool
) -> None:
    """Idle pooled connections whose backends were terminated (as by a Postgres restart): with the
    checkout check every statement still succeeds, on new connections; without it they fail."""
    db = Database(make_settings(postgres, redis_server, simulator, db_pool_pre_ping=pre_ping, db_pool_size=3))
    try:
        pids = await _backend_pids(db, 3)
        assert len(pids) == 3
        with psycopg.connect(postgres.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [list(pids)])
        await asyncio.sleep(0.2)  # the FATAL message and the close reach the client sockets
        if pre_ping:
            new = await _backend_pids(db, 3)
            assert not new & pids
        else:
            results = await asyncio.gather(*(_backend_pids(db, 1) for _ in range(3)), return_exceptions=True)
            assert any(isinstance(r, psycopg.OperationalError) for r in results), results
    finally:
        await db.aclose()
