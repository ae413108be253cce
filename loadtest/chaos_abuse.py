"""Abusive clients for the chaos campaign's abuse scenario, on raw sockets (an HTTP library would
refuse to send most of these): oversized and endless bodies, invalid UTF-8, deep nesting, and clients
that hold connections without finishing a request.

Each case says what a well-behaved server answers: a clear 4xx, or a closed connection within the
server's deadline; never a 5xx and never a connection held open past the deadline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CLOSED = "closed"
STALLED = "no answer"


@dataclass(frozen=True)
class AbuseOutcome:
    case: str
    answer: str  # an HTTP status ("413"), "closed" or "no answer"
    seconds: float
    ok: bool
    expected: str


@dataclass(frozen=True)
class Deadlines:
    """The server's deadlines (``header_timeout_s``, ``body_timeout_s``) and the slack allowed on top."""

    header_s: float
    body_s: float
    slack_s: float = 3.0


def _connect(port: int, timeout_s: float) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(timeout_s)
    return s


def _answer(s: socket.socket) -> str:
    """The status code of the first response line, "closed" on EOF/reset, "no answer" on timeout."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return STALLED
    except OSError:
        return CLOSED
    if not data:
        return CLOSED
    parts = data.split(b"\r\n", 1)[0].split()
    return parts[1].decode() if len(parts) >= 2 and parts[1].isdigit() else CLOSED


def _send(s: socket.socket, data: bytes) -> bool:
    """False when the server already closed (a broken pipe while sending is an answer too)."""
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


def _send_only(s: socket.socket, data: bytes) -> None:
    _send(s, data)


def _head(extra: str) -> bytes:
    return (f"POST /task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}\r\n").encode()


def _full(body: bytes) -> bytes:
    return _head(f"Content-Length: {len(body)}\r\n") + body


def _is_4xx(answer: str) -> bool:
    return answer.isdigit() and 400 <= int(answer) < 500


def _case(
    name: str, expected: str, port: int, wait_s: float, act: Callable[[socket.socket], None], ok: Callable[[str], bool]
) -> AbuseOutcome:
    t0 = time.monotonic()
    try:
        s = _connect(port, wait_s)
    except OSError as exc:
        return AbuseOutcome(name, f"connect failed: {exc}", time.monotonic() - t0, False, expected)
    with s:
        act(s)
        answer = _answer(s)
    return AbuseOutcome(name, answer, round(time.monotonic() - t0, 3), ok(answer), expected)


def oversized_length(port: int, d: Deadlines) -> AbuseOutcome:
    def act(s: socket.socket) -> None:  # the declared length alone must be refused
        _send(s, _head("Content-Length: 1048576\r\n"))

    return _case("oversized body (Content-Length 1 MiB)", "413", port, 10, act, lambda a: a == "413")


def oversized_chunked(port: int, d: Deadlines) -> AbuseOutcome:
    def act(s: socket.socket) -> None:
        if not _send(s, _head("Transfer-Encoding: chunked\r\n")):
            return
        for _ in range(3):  # 12 KiB, then wait for the answer (more would race the server's close)
            if not _send(s, b"1000\r\n" + b"x" * 4096 + b"\r\n"):
                return

    return _case("oversized chunked body (12 KiB, no length)", "413", port, 10, act, lambda a: a == "413")


def chunked_without_end(port: int, d: Deadlines) -> AbuseOutcome:
    def act(s: socket.socket) -> None:
        if _send(s, _head("Transfer-Encoding: chunked\r\n")):
            _send(s, b'a\r\n{"persona_\r\n')  # ... and never the rest, nor the last chunk

    limit = d.body_s + d.slack_s
    return _case(
        "chunked body without end",
        f"408 or closed within {limit:g}s",
        port,
        limit,
        act,
        lambda a: a in ("408", CLOSED),
    )


def stalled_body(port: int, d: Deadlines) -> AbuseOutcome:
    def act(s: socket.socket) -> None:
        if _send(s, _head("Content-Length: 200\r\n")):
            _send(s, b'{"persona_id": "p')

    limit = d.body_s + d.slack_s
    return _case(
        "body shorter than its Content-Length",
        f"408 or closed within {limit:g}s",
        port,
        limit,
        act,
        lambda a: a in ("408", CLOSED),
    )


def invalid_utf8(port: int, d: Deadlines) -> AbuseOutcome:
    body = b'{"persona_id": "persona-1", "topic": "\xff\xfe\xc3("}'
    return _case("invalid UTF-8", "4xx", port, 10, lambda s: _send_only(s, _full(body)), _is_4xx)


def nested_json(port: int, d: Deadlines) -> AbuseOutcome:
    body = b"[" * 4000 + b"]" * 4000
    return _case("deeply nested JSON (4000 levels)", "4xx", port, 10, lambda s: _send_only(s, _full(body)), _is_4xx)


def nested_object(port: int, d: Deadlines) -> AbuseOutcome:
    body = b'{"persona_id": ' * 500 + b"1" + b"}" * 500
    return _case("deeply nested object (500 levels)", "4xx", port, 10, lambda s: _send_only(s, _full(body)), _is_4xx)


def slow_headers(port: int, d: Deadlines) -> AbuseOutcome:
    """Slowloris: one header byte every 0.5 s, forever; the server must close the connection."""
    limit = d.header_s + d.slack_s
    t0 = time.monotonic()
    try:
        s = _connect(port, 0.5)
    except OSError as exc:
        return AbuseOutcome("slow headers", f"connect failed: {exc}", 0.0, False, "closed")
    expected = f"closed within {limit:g}s"
    with s:
        request = _head("X-Slow: " + "a" * 200 + "\r\n")
        for byte in request:
            if not _send(s, bytes([byte])):
                break
            answer = _answer(s)  # waits 0.5 s for an answer; a timeout means "keep trickling"
            if answer != STALLED:
                took = round(time.monotonic() - t0, 3)
                return AbuseOutcome("slow headers", answer, took, answer == CLOSED and took <= limit, expected)
            if time.monotonic() - t0 > limit:
                break
    took = round(time.monotonic() - t0, 3)
    return AbuseOutcome("slow headers", CLOSED if took <= limit else STALLED, took, took <= limit, expected)


def idle_connection(port: int, d: Deadlines) -> AbuseOutcome:
    limit = d.header_s + d.slack_s
    return _case(
        "idle connection (sends nothing)",
        f"closed within {limit:g}s",
        port,
        limit,
        lambda s: None,
        lambda a: a == CLOSED,
    )


CASES: tuple[Callable[[int, Deadlines], AbuseOutcome], ...] = (
    oversized_length,
    oversized_chunked,
    chunked_without_end,
    stalled_body,
    invalid_utf8,
    nested_json,
    nested_object,
)
HOLDERS: tuple[Callable[[int, Deadlines], AbuseOutcome], ...] = (slow_headers, idle_connection, chunked_without_end)


def run_abuse(port: int, deadlines: Deadlines, *, holders: int = 20, rounds: int = 3) -> list[AbuseOutcome]:
    """Every case ``rounds`` times, and ``holders`` clients of each connection-holding kind at once,
    all concurrently with whatever else is running (the steady load, whose latency is the stall test)."""
    jobs: list[Callable[[int, Deadlines], AbuseOutcome]] = [c for _ in range(rounds) for c in CASES]
    jobs += [h for h in HOLDERS for _ in range(holders)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: job(port, deadlines), jobs))
