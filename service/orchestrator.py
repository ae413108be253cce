"""Run the API: ``python -m service.orchestrator`` (uvicorn, ``processes`` workers on ``host:port``).

Graceful shutdown, in this order, on SIGTERM/SIGINT:

1. readiness (``/readyz``) answers 503 at once, while requests are still served, so a load balancer
   stops routing here (``DRAIN_DELAY_S``, at most a quarter of ``shutdown_timeout_s``);
2. uvicorn stops listening and waits for in-flight requests, bounded by ``shutdown_timeout_s``;
3. lifespan shutdown closes the pools and marks this process dead for multiprocess metrics.

With ``processes > 1`` prometheus-client runs in multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` must
be set before ``prometheus_client`` is imported anywhere, so this module sets it (a fresh temp dir
if unset, otherwise the given dir emptied of stale files) before importing the app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.guard import QUEUED_AT

log = logging.getLogger("loadproof.orchestrator")

MAX_DRAIN_DELAY_S = 5.0


def prepare_multiprocess_dir(processes: int) -> Path | None:
    """Set up ``PROMETHEUS_MULTIPROC_DIR`` when several processes serve; None for one process."""
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if processes <= 1 and not current:
        return None
    if current:
        path = Path(current)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # values of a previous run would be summed into ours
            stale.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="loadproof-prom-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """httptools with a header deadline: uvicorn bounds only the idle time *between* requests, so a
    client that connects and sends nothing, or trickles its headers (slowloris), would hold its
    connection forever. Here a connection is closed when a request's headers are not complete within
    ``header_timeout_s`` of the connect or of the request's first byte. It also stamps when a request's
    task is made (``QUEUED_AT``), so the guard sees how long the request waited for its first loop
    turn: the queue an overloaded loop builds before any middleware runs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        from service.config import get_settings

        self._header_timeout_s = get_settings().header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self._header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.debug("closing a connection whose request headers took over %.1fs", self._header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self.scope[QUEUED_AT] = time.perf_counter()  # type: ignore[literal-required]
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel_header_timer()  # idle until the next request is the keep-alive timer's business

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def drain_delay_s(shutdown_timeout_s: float) -> float:
    return min(MAX_DRAIN_DELAY_S, shutdown_timeout_s / 4)


def app_factory() -> FastAPI:
    """What each uvicorn worker process builds: the API with drain-on-signal enabled."""
    from service.api import create_app
    from service.config import get_settings

    settings = get_settings()
    return create_app(settings, drain_delay_s=drain_delay_s(settings.shutdown_timeout_s))


def main() -> None:
    from service.config import get_settings

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    created = prepare_multiprocess_dir(settings.processes)
    config = uvicorn.Config(
        "service.orchestrator:app_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.processes,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=4096,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=int(max(1, settings.shutdown_timeout_s)),
        limit_concurrency=None,
        http="service.orchestrator:HeaderDeadlineProtocol",
        loop="uvloop",
    )
    server = uvicorn.Server(config)
    print(
        f"loadproof orchestrator on http://{settings.host}:{settings.port} ({settings.processes} process(es))",
        flush=True,
    )
    try:
        if settings.processes > 1:
            from uvicorn.supervisors import Multiprocess

            sock = config.bind_socket()
            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run()
    finally:
        if created is not None and not os.environ.get("LOADPROOF_KEEP_MULTIPROC_DIR"):
            shutil.rmtree(created, ignore_errors=True)
    if not server.started and settings.processes <= 1:
        sys.exit(3)


if __name__ == "__main__":
    main()
