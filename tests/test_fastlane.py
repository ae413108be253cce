"""The API server's own protocol (service/orchestrator.py): a response's head and body in one write, and
``POST /task`` served by the fast lane, with HTTP semantics unchanged (pipelining, keep-alive, fallbacks)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pytest

from localstack.servers import PostgresServer, RedisServer
from localstack.services import OrchestratorServer, SimulatorServer
from service.orchestrator import PairedWrites
from tests.conftest import flush_redis, run_async, service_env, truncate_tasks


class Recorder:
    """A transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_paired_writes_join_head_and_body_and_hold_nothing_past_one_loop_turn() -> None:
    async def scenario() -> Recorder:
        raw = Recorder()
        paired = PairedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        paired.write(b"HEAD ")
        paired.write(b"BODY")  # joins the held head: one write
        assert raw.writes == [b"HEAD BODY"]
        paired.write(b"alone")
        assert raw.writes == [b"HEAD BODY"]  # held ...
        await asyncio.sleep(0)
        assert raw.writes == [b"HEAD BODY", b"alone"]  # ... until the loop's next turn
        paired.write(b"last words")
        paired.close()  # what is held is written before the close
        assert raw.writes[-1] == b"last words" and raw.closed
        assert paired.get_extra_info("peername") == "info:peername"  # the rest is the transport's
        return raw

    raw = run_async(scenario())
    assert len(raw.writes) == 3


@pytest.fixture(scope="module")
def api(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> Iterator[OrchestratorServer]:
    truncate_tasks(postgres)
    flush_redis(redis_server)
    server = OrchestratorServer(service_env(postgres, redis_server, simulator))
    server.start(60)
    try:
        yield server
    finally:
        server.cleanup()


def _post(topic: str, *, extra: str = "", body: str | None = None) -> bytes:
    payload = body if body is not None else json.dumps({"persona_id": "persona-1", "topic": topic})
    return (
        f"POST /task HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(payload.encode())}\r\n\r\n{payload}"
    ).encode()


def _responses(sock: socket.socket, count: int, within_s: float = 10.0) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` HTTP/1.1 responses (content-length bodies) from ``sock``."""
    buf, out, deadline = b"", [], time.monotonic() + within_s
    while len(out) < count:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = buf[:head_end].decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            end = head_end + 4 + int(headers.get("content-length", "0"))
            if len(buf) >= end:
                out.append((int(lines[0].split()[1]), headers, buf[head_end + 4 : end]))
                buf = buf[end:]
                continue
        assert time.monotonic() < deadline, f"only {len(out)} of {count} responses: {buf[:300]!r}"
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(out)} of {count} responses"
        buf += chunk
    return out


def test_pipelined_requests_are_answered_in_order_through_the_lane_and_its_fallbacks(api: OrchestratorServer) -> None:
    """A new task (lane), a body that is not a task (lane declines: FastAPI's 422), a keyed request (the app's
    path) and a probe, pipelined on one connection: four answers, in order."""
    requests = (
        _post("fast lane pipelined")
        + _post("", body='{"persona_id": "p"}')
        + _post("keyed pipelined", extra="idempotency-key: fastlane-1\r\n")
        + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(requests)
        answers = _responses(sock, 4)
    assert [status for status, _, _ in answers] == [202, 422, 202, 200]
    assert json.loads(answers[0][2])["status"] == "queued"
    assert "topic" in answers[1][2].decode()  # FastAPI's own error names the missing field
    assert answers[0][1]["content-type"] == "application/json" and "date" in answers[0][1]


def test_keep_alive_and_connection_close_hold_in_the_lane(api: OrchestratorServer) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        for i in range(3):  # one connection, one request after the other
            sock.sendall(_post(f"keep alive {i}"))
            assert _responses(sock, 1)[0][0] == 202
        sock.sendall(_post("then close", extra="connection: close\r\n"))
        ((status, headers, _),) = _responses(sock, 1)
        assert status == 202 and headers.get("connection") == "close"
        sock.settimeout(5)
        assert sock.recv(1) == b""  # and the server closed it


def test_a_body_still_arriving_takes_the_app_path(api: OrchestratorServer) -> None:
    request = _post("slow body")
    head_end = request.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(request[: head_end + 5])
        time.sleep(0.3)
        sock.sendall(request[head_end + 5 :])
        ((status, _, body),) = _responses(sock, 1)
    assert status == 202 and json.loads(body)["status"] == "queued"
