"""A stand-in for the task API with scripted task fates, for the k6 client-flow tests.

``POST /task`` and ``GET /task/{id}`` speak the service's wire format (202 ``{"status", "task_id"}``,
200 ``{"status", ...}``); which fate each new task gets is decided by its arrival number, so a test knows
exactly how many flows must end done, failed, timed out or rejected, and how long a done task takes.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Fate by arrival number modulo 10: the rest are done DONE_AFTER_S after their POST.
FAILED, NEVER, REJECTED = 3, 7, 5
DONE_AFTER_S = 0.3


def fate(n: int) -> str:
    return {FAILED: "failed", NEVER: "timeout", REJECTED: "rejected"}.get(n % 10, "done")


@dataclass
class FlowSink:
    """What the sink saw: POSTs by fate, every GET path, and when each task was created."""

    url: str = ""
    posts: list[str] = field(default_factory=list)  # the fate of each POST, in arrival order
    gets: list[str] = field(default_factory=list)
    created: dict[str, tuple[float, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expected(self, outcome: str) -> int:
        return sum(1 for f in self.posts if f == outcome)


def _handler(sink: FlowSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, doc: dict[str, object]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with sink.lock:
                what = fate(len(sink.posts))
                sink.posts.append(what)
                task_id = str(uuid.uuid4())
                if what != "rejected":
                    sink.created[task_id] = (time.monotonic(), what)
            if what == "rejected":
                self._send(503, {"detail": "overloaded"})
            else:
                self._send(202, {"status": "queued", "task_id": task_id})

        def do_GET(self) -> None:
            task_id = self.path.rsplit("/", 1)[-1]
            with sink.lock:
                sink.gets.append(self.path)
                created = sink.created.get(task_id)
            if created is None:
                self._send(404, {"detail": "no such task"})
                return
            at, what = created
            status = "running"
            if what == "failed":
                status = "failed"
            elif what == "done" and time.monotonic() - at >= DONE_AFTER_S:
                status = "done"
            self._send(200, {"status": status, "task_id": task_id})

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def flow_sink() -> Iterator[FlowSink]:
    sink = FlowSink()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(sink))
    server.daemon_threads = True
    sink.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
