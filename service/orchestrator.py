"""Run the API: ``python -m service.orchestrator`` (uvicorn, ``processes`` workers on ``host:port``).

Graceful shutdown, in this order, on SIGTERM/SIGINT:

1. readiness (``/readyz``) answers 503 at once, while requests are still served, so a load balancer
   stops routing here (``DRAIN_DELAY_S``, at most a quarter of ``shutdown_timeout_s``);
2. uvicorn stops listening and waits for in-flight requests, bounded by ``shutdown_timeout_s``;
3. lifespan shutdown closes the pools and marks this process dead for multiprocess metrics.

The server's HTTP protocol is uvicorn's httptools one with three additions (:class:`HeaderDeadlineProtocol`):
a header deadline, a response's head and body written at once (:class:`PairedWrites`), and a fast
lane: a ``POST /task`` whose body arrived with its headers is answered by the guard directly
(``Guard.serve_body``: same admission, handler and metrics), not through an ASGI app task: the
per-request machinery it skips was most of a cache hit's CPU (``make profile`` shows the split).

With ``processes > 1`` prometheus-client runs in multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` must
be set before ``prometheus_client`` is imported anywhere, so this module sets it (a fresh temp dir
if unset, otherwise the given dir emptied of stale files) before importing the app.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.guard import LANE, QUEUED_AT, Guard

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


class PairedWrites:
    """The connection's transport, writing a response's head and body in one system call.

    uvicorn writes a response's status line and headers, then its body, as two ``transport.write``
    calls; uvloop sends each at once, so every response cost two ``send()`` calls (a profile of the
    hot path put the first at ~9 % of the API's CPU). Here a write is held until the next one joins
    it, or until the loop's next turn at the latest, so nothing waits longer than that.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self._release)
        else:
            joined, self._held = self._held + bytes(data), None
            self._transport.write(joined)

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))

    def _release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> object:  # everything else is the transport's own
        return getattr(self._transport, name)


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
        self.transport = PairedWrites(transport, self.loop)  # type: ignore[assignment]  # flow control keeps the real one
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

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """``POST /task`` goes through the fast lane (``Guard.serve_body``); everything else, and
        anything the lane declines, through the app as uvicorn runs it."""
        lane = LANE[0]
        if lane is None or not lane.takes(cycle.scope):  # type: ignore[arg-type]
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(self._fast_lane(lane, cycle, app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    @staticmethod
    async def _fast_lane(lane: Guard, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # The body usually arrived with the headers; one still on its way takes the app's path (and
        # the guard's body deadline). The body is only read here, so the app can still receive it.
        if not cycle.more_body:
            try:
                served = await lane.serve_body(cycle.scope, bytes(cycle.body), cycle.send)  # type: ignore[arg-type]
            except BaseException as exc:  # as uvicorn's run_asgi: a 500, or a closed connection once started
                log.error("exception in the fast lane", exc_info=exc)
                if not cycle.response_started:
                    await cycle.send_500_response()
                else:
                    cycle.transport.close()
                served = True
            if served:
                cycle.on_response = lambda: None
                return
        await cycle.run_asgi(app)


def drain_delay_s(shutdown_timeout_s: float) -> float:
    return min(MAX_DRAIN_DELAY_S, shutdown_timeout_s / 4)


def app_factory() -> FastAPI:
    """What each uvicorn worker process builds: the API with drain-on-signal enabled."""
    from service.api import create_app
    from service.config import get_settings

    settings = get_settings()
    app = create_app(settings, drain_delay_s=drain_delay_s(settings.shutdown_timeout_s))
    # What exists now (the imported framework, models, routes) lives as long as the process: out of the
    # collector's sight, a full collection walks only what requests allocate instead of stalling the
    # loop for every request waiting behind it.
    gc.collect()
    gc.freeze()
    return app


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
