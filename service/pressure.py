"""Overload pressure (opt-in, ``overload_signal_ttl_ms`` > 0): while the API sheds, the workers yield,
because their work competes for the same Postgres, Redis and (on one machine) cores as the requests
being served. Off by default: with clients that poll for their tasks it feeds the overload (see
docs/service.md, *Sustained overload*).

Why not CPU priority alone: measured in the chaos campaign's overload (3x the sustainable rate, the
whole stack and k6 on 2 cores, 10 s windows), the served p95 was ~600-800 ms with the workers at
nice 5 or 15, and 219 ms (with 757 requests/s served instead of ~330) with the workers and the
simulator stopped. The work a worker causes runs in Postgres and Redis at their priority (claims,
completions, acknowledgements, cache writes), whatever the worker's own nice.

So an API process that sheds a ``POST`` for overload (``max_inflight``, ``queue_wait``, ``loop_lag``)
sets a key in Redis that expires after ``overload_signal_ttl_ms`` (at most one write per
``SIGNAL_INTERVAL_S`` per process), and each worker, which reads it every ``POLL_S``, keeps at most
``worker_pressure_batches`` batches in flight while it exists. The backlog is durable in Postgres
and the stream; tasks finish later, none is put at risk. Without Redis there is no signal, and
workers work as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from service.config import Settings

SIGNAL_INTERVAL_S = 0.5
POLL_S = 0.25


def pressure_key(settings: Settings) -> str:
    return f"{settings.queue_stream}:pressure"


class PressureSignal:
    """API side: ``shed()`` is called for every request refused for overload; cheap when repeated."""

    def __init__(self, settings: Settings, client: Any) -> None:
        self.client = client
        self.key = pressure_key(settings)
        self.ttl_ms = int(settings.overload_signal_ttl_ms)
        self._next = 0.0
        self._writes: set[asyncio.Task[None]] = set()

    def shed(self) -> None:
        if self.ttl_ms <= 0:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + SIGNAL_INTERVAL_S
        write = asyncio.get_running_loop().create_task(self._set())
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _set(self) -> None:
        with contextlib.suppress(Exception):  # best effort: a request never waits for or fails on it
            await self.client.set(self.key, b"1", px=self.ttl_ms)


async def under_pressure(settings: Settings, client: Any) -> bool:
    """Worker side: whether an API process shed for overload within the last ``overload_signal_ttl_ms``."""
    try:
        return bool(await client.exists(pressure_key(settings)))
    except Exception:
        return False
