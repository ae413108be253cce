"""A lean HTTP/1.1 transport under the ``openai`` SDK, for the worker's streamed LLM calls.

Why: a streamed reply is one chunk per token, and a worker at the demo's peak reads thousands of
them a second over a hundred-odd open calls. Profiled there (py-spy, the whole worker), the default
transport's layers (httpx's pool, httpcore, anyio) took about a third of the worker's CPU: each
chunk crosses several async generators and cancel scopes, and every request scans the whole pool,
polling each idle socket. Here one asyncio protocol per connection parses with ``httptools`` (the
parser uvicorn serves with) and hands the body over as it arrives; idle connections wait in a
LIFO list per origin. The SDK above is unchanged: it builds the request, decodes the server-sent
events and maps errors and statuses, since this transport raises httpx's own exception types.

What it does not do, by design: proxies, HTTP/2, ``Expect: 100-continue``, a connection limit
(the worker's adaptive limiter bounds concurrent calls). ``llm_http_client=httpx`` uses the SDK's
default client instead, e.g. behind a proxy.

A connection is reused only after its response was read to the end with keep-alive; one that the
server closed while idle is seen closed (``connection_lost``) and never handed out. A request sent
on a reused connection that closes before any byte of the response is sent once more on a new one
(the race of a server closing an idle connection as the request goes out).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools  # type: ignore[import-untyped]
import httpx2

Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one response in flight, parsed as it arrives."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.complete = False
        self.keep_alive = False  # read with the head: httptools forgets it once the message is complete
        self.received = False  # any byte of the current response
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self.head is None:  # nothing asked: a server talking to an idle connection is closing it
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"malformed HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(httpx2.ReadError(f"connection closed before the response ended ({exc!r})"))

    # --- httptools callbacks
    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # --- the transport's side
    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def exchange(self, data: bytes, timeout_s: float | None) -> None:
        """Send a whole request; return once the response's head is in."""
        if self.closed or self.transport is None:
            raise httpx2.ReadError("connection closed")
        self._reset()
        self.head = head = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            async with asyncio.timeout(timeout_s):
                await head
        except TimeoutError:
            self.close()
            raise httpx2.ReadTimeout("no response head within the read timeout") from None

    async def next_chunk(self, timeout_s: float | None) -> bytes | None:
        """The next body bytes as they arrived, or None at the end of the response."""
        while True:
            if self.chunks:
                return self.chunks.popleft()
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._waiter
            except TimeoutError:
                raise httpx2.ReadTimeout("no response bytes within the read timeout") from None

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed


class _Body(httpx2.AsyncByteStream):
    def __init__(self, pool: LeanTransport, conn: _Connection, read_timeout_s: float | None) -> None:
        self._pool = pool
        self._conn = conn
        self._timeout = read_timeout_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._conn.next_chunk(self._timeout)) is not None:
            yield chunk

    async def aclose(self) -> None:
        self._pool.release(self._conn)


class LeanTransport(httpx2.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 (and HTTPS) connections per origin; see the module docstring."""

    def __init__(self, *, max_idle_per_origin: int = 512, ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_idle = max_idle_per_origin
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin: Origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        data = _serialize(request, await request.aread())
        read_s = timeouts.get("read")
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                await conn.exchange(data, read_s)
            except BaseException as exc:
                conn.close()
                if not isinstance(exc, httpx2.ReadError) or conn.received:
                    raise
                conn = None  # closed as it was reused, before any response byte: once more, on a new one
        if conn is None:
            conn = await self._connect(origin, timeouts.get("connect"))
            try:
                await conn.exchange(data, read_s)
            except BaseException:
                conn.close()
                raise
        reason = conn.reason.decode("latin-1")
        return httpx2.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn, read_s),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason.encode("latin-1")},
        )

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, origin: Origin, timeout_s: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin), host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx2.ConnectError(f"connecting to {host}:{port} failed: {exc}") from exc
        return conn

    def release(self, conn: _Connection) -> None:
        """Back to the idle list if its response was read to the end with keep-alive; closed otherwise."""
        if not conn.reusable:
            conn.close()
            return
        conn.head = None
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        idle.append(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.close()
        self._idle.clear()


def _serialize(request: httpx2.Request, body: bytes) -> bytes:
    target = request.url.raw_path or b"/"
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    has_length = False
    for name, value in request.headers.raw:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            continue  # the body is whole here: sent with its length
        if lowered == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if not has_length and (body or request.method in ("POST", "PUT", "PATCH")):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
