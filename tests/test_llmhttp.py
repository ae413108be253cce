"""The lean LLM transport (service/llmhttp.py) against real sockets: keep-alive, streaming, closes, timeouts."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx2
import pytest

from localstack.services import SimulatorServer
from service.llmhttp import LeanTransport
from tests.conftest import run_async


def on_both_loops(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The async test run once on asyncio's loop and once on uvloop's: the worker runs on uvloop, whose
    transports are not asyncio's classes (an ``isinstance`` check passed on one and failed on the other)."""

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    @functools.wraps(test)
    def run(loop: str, *args: Any, **kwargs: Any) -> None:
        run_async(test(*args, **kwargs), uvloop=loop == "uvloop")

    params = [inspect.Parameter("loop", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    run.__signature__ = inspect.signature(test).replace(  # type: ignore[attr-defined]
        parameters=params + list(inspect.signature(test).parameters.values())
    )
    return run


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    return head + await reader.readexactly(length)


class Server:
    """A raw HTTP server whose connections run ``handler(reader, writer, connection number)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.handler(reader, writer, self.connections)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _client(timeout_s: float = 5.0) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=LeanTransport(), timeout=timeout_s)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@on_both_loops
async def test_keep_alive_reuses_one_connection_for_sequential_requests() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            request = await _read_request(reader)
            assert request.startswith(b"POST /v1/x HTTP/1.1\r\n") and request.endswith(b'{"a":1}')
            writer.write(OK)

    server = Server(handler)
    async with server as url, _client() as client:
        for _ in range(3):
            r = await client.post(f"{url}/v1/x", content=b'{"a":1}')
            assert (r.status_code, r.text) == (200, "ok")
    assert server.connections == 1


@on_both_loops
async def test_a_chunked_body_is_handed_over_as_it_arrives() -> None:
    second = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await second.wait()  # the second chunk only after the client saw the first
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    async with Server(handler) as url, _client() as client, client.stream("GET", url) as r:
        parts: list[bytes] = []
        async for part in r.aiter_raw():
            parts.append(part)
            second.set()
    assert b"".join(parts) == b"firstsecond" and parts[0] == b"first"


@on_both_loops
async def test_an_idle_connection_closed_by_the_server_is_never_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _read_request(reader)
        writer.write(OK)
        await writer.drain()  # then the server closes the connection (idle timeout, restart)

    server = Server(handler)
    async with server as url, _client() as client:
        assert (await client.get(url)).status_code == 200
        await asyncio.sleep(0.1)
        assert (await client.get(url)).status_code == 200
    assert server.connections == 2


@on_both_loops
async def test_a_reused_connection_closed_as_the_request_goes_out_is_retried_once_on_a_new_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await _read_request(reader)
        writer.write(OK)
        if number == 1:
            await _read_request(reader)  # the second request on this connection: closed without an answer
            return
        while True:
            await _read_request(reader)
            writer.write(OK)

    server = Server(handler)
    async with server as url, _client() as client:
        assert (await client.get(url)).status_code == 200
        assert (await client.get(url)).status_code == 200
    assert server.connections == 2


@on_both_loops
@pytest.mark.parametrize("stall", ["head", "body"])
async def test_a_stalled_response_is_a_read_timeout_and_its_connection_is_dropped(stall: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await _read_request(reader)
        if number == 1:
            if stall == "body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await asyncio.sleep(5)
            return
        writer.write(OK)

    server = Server(handler)
    async with server as url, _client(timeout_s=0.3) as client:
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(url)
        assert (await client.get(url)).status_code == 200  # on a new connection
    assert server.connections == 2


@on_both_loops
async def test_connection_refused_is_a_connect_error() -> None:
    async with Server(lambda *_: asyncio.sleep(0)) as url:
        pass  # closed: nothing listens there now
    async with _client() as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(url)


@on_both_loops
async def test_the_sdk_streams_the_simulator_through_it(simulator: SimulatorServer) -> None:
    """The openai SDK on this transport reads the simulator's server-sent events to the end."""
    from openai import AsyncOpenAI

    simulator.reset()
    async with _client() as http:
        sdk = AsyncOpenAI(base_url=simulator.base_url, api_key="x", max_retries=0, http_client=http)
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "write one post"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
