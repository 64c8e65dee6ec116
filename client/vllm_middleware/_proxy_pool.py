"""The proxy's HTTP/1.1 connections to its upstreams: a small client on asyncio protocols.

A general client (httpx over httpcore, h11 and anyio) spent most of the proxy's instructions
on every request: request and response objects built and validated, the request head and body
written in two sends, each event parsed in pure Python. A proxy needs none of it: the request
arrives already parsed and checked by the server in front, so here it is written out in one
`write`, and the response is parsed by httptools (llhttp, in C) straight into a status, raw
headers and body chunks that the proxy passes on as they are.

Each origin keeps a stack of idle keep-alive connections: a request takes the most recently
used one (its socket is the likeliest to be alive), and gives it back when its response was
read to the end and the upstream allows keep-alive; any other end (an error, a timeout, the
caller cancelled) aborts the connection, so the upstream sees the request go away. A request
on a reused connection that the upstream closed before answering anything (its keep-alive
timeout raced the request) is sent once more on a new connection, as browsers and nginx do.

The body is read with flow control: past `_HIGH_WATER` bytes received and not yet taken, the
socket stops being read until the taker catches up, so a slow client slows the upstream
instead of filling the proxy's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

__all__ = ["UpstreamCall", "UpstreamError", "UpstreamPool", "UpstreamTimeout"]

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_ONE_WRITE = 64 * 1024  # a body this small is joined to its head: one send
Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """No (complete) response from an upstream: it cannot be reached, broke the connection or
    answered something that is not HTTP/1.1."""

    timeout = False


class UpstreamTimeout(UpstreamError):
    """An upstream took longer than its timeout (to connect, to take the request, between
    two reads, or no connection was free in time)."""

    timeout = True


class _Connection(asyncio.Protocol):
    """One keep-alive connection, parsing one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False  # it has carried a response before
        self.idle_since = 0.0
        self.in_use = True  # a request of ours is on it (False while idle in the pool)
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.error: UpstreamError | None = None
        self.received = False  # any byte of this response
        self.head_request = False
        self._informational = False
        self._framed = False  # Content-Length or chunked: the end is known without a close
        self._paused = False
        self._keep_alive = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"invalid HTTP response: {exc}"))
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.complete and not self._framed and self.error is None:
            self.complete = True  # a body delimited by the connection's close (RFC 9112 §6.3)
            self._wake()
        elif not self.complete:
            detail = f": {exc}" if exc is not None else ""
            self.fail(UpstreamError(f"the upstream closed the connection{detail}"))
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the real response follows
            self._informational = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it at the end
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._framed = True
        if status in (204, 304) or self.head_request:
            self._framed = True
            if self.head_request:
                self.complete = True  # the parser would wait for a body: never reused
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        self._wake()

    # -- for UpstreamCall -------------------------------------------------------------------
    def fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float, what: str) -> None:
        """Until the parser has news (head, body, end, error), at most `timeout` seconds."""
        waiter = self.loop.create_future()
        self._waiter = waiter
        timer = self.loop.call_later(timeout, _expire, waiter, what, timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def drain(self, timeout: float) -> None:
        drained = self._drained
        if drained is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(drained)
        except TimeoutError:
            raise UpstreamTimeout(f"the upstream took no data for {timeout:g} s") from None

    def take(self) -> bytes:
        chunks = self.chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.error is None
            and not self.head_request
            and self._keep_alive
        )

    def recycle(self) -> None:
        self.in_use = False
        self.reused = True
        self.idle_since = self.loop.time()
        self._reset()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None], what: str, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"no {what} from the upstream in {timeout:g} s"))


class _Origin:
    """Where one upstream origin is, and its idle connections."""

    __slots__ = ("host", "host_header", "idle", "port", "tls")

    def __init__(self, origin: str) -> None:
        parts = urlsplit(origin)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna")
        self.idle: list[_Connection] = []


class UpstreamCall:
    """One request sent to an upstream: `head()`, then `read()` until it says last, then
    `release()` (always: it gives the connection back, or closes it if the response is not
    complete)."""

    __slots__ = ("_conn", "_origin", "_pool", "_released", "_request", "_retried", "read_timeout")

    def __init__(
        self,
        pool: UpstreamPool,
        origin: _Origin,
        conn: _Connection,
        request: tuple[bytes, bytes],
        read_timeout: float,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._request = request
        self._released = False
        self._retried = False
        self.read_timeout = read_timeout

    async def head(self) -> tuple[int, Headers]:
        """The status and raw headers (names as the upstream wrote them)."""
        conn = self._conn
        while not conn.head_done:
            error = conn.error
            if error is not None:
                if conn.reused and not conn.received and not self._retried:
                    conn = await self._resend()
                    continue
                raise error
            await conn.wait(self.read_timeout, "response")
        return conn.status, conn.headers

    async def _resend(self) -> _Connection:
        self._retried = True
        self._conn.abort()
        conn = self._conn = await self._pool.connect(self._origin)
        await self._pool.write(conn, self._request)
        return conn

    async def read(self) -> tuple[bytes, bool]:
        """(the body bytes received since the last read, whether the body has ended)."""
        conn = self._conn
        while True:
            if conn.chunks:
                chunk = conn.take()
                return chunk, conn.complete
            if conn.complete:
                return b"", True
            error = conn.error
            if error is not None:
                raise error
            await conn.wait(self.read_timeout, "data")

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool.give_back(self._origin, self._conn)


class UpstreamPool:
    """HTTP/1.1 keep-alive connections to any number of origins, at most `max_connections`
    in use at once (a request waits up to the `pool` timeout for one)."""

    def __init__(
        self,
        *,
        max_connections: int = 1000,
        max_idle_per_origin: int = 1000,
        keepalive_expiry: float = 60.0,
        connect_timeout: float = 10.0,
        timeout: float = 600.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._origins: dict[str, _Origin] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle_per_origin
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            import httpx  # its context: certifi's roots, as the SDK doors use

            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def send(
        self, origin_url: str, method: str, target: bytes, headers: Headers, body: bytes
    ) -> UpstreamCall:
        """Send a request (headers without Host or Content-Length: written here) and return
        the call to read its response from. Raises `UpstreamError` when it cannot be sent."""
        origin = self._origins.get(origin_url)
        if origin is None:
            origin = self._origins[origin_url] = _Origin(origin_url)
        request = _request_bytes(method, target, origin.host_header, headers, body)
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await slots.acquire()
            except TimeoutError:
                raise UpstreamTimeout("no upstream connection free in time") from None
        else:
            await slots.acquire()
        conn = None
        try:
            conn = self._checkout(origin) or await self.connect(origin)
            conn.head_request = method == "HEAD"
            call = UpstreamCall(self, origin, conn, request, self.timeout)
            await self.write(conn, request)
        except BaseException:
            slots.release()
            if conn is not None:
                conn.abort()  # a request half written (or its caller gone): not reusable
            raise
        return call

    def _checkout(self, origin: _Origin) -> _Connection | None:
        idle = origin.idle
        now = None
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            now = now or conn.loop.time()
            if now - conn.idle_since < self._keepalive_expiry:
                conn.in_use = True
                return conn
            conn.abort()
        return None

    async def connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._ssl() if origin.tls else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            message = f"cannot connect to {origin.host}:{origin.port} in {self.connect_timeout:g} s"
            raise UpstreamTimeout(message) from None
        except OSError as exc:
            message = f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}"
            raise UpstreamError(message) from None
        return conn

    async def write(self, conn: _Connection, request: tuple[bytes, bytes]) -> None:
        transport = conn.transport
        if conn.closed or transport is None:
            conn.fail(UpstreamError("the upstream closed the connection"))
            return  # head() sends it again on a new connection
        head, body = request
        if body:
            transport.writelines((head, body))
        else:
            transport.write(head)
        await conn.drain(self.timeout)

    def give_back(self, origin: _Origin, conn: _Connection) -> None:
        self._slots.release()
        if not self._closed and conn.reusable() and len(origin.idle) < self._max_idle:
            conn.recycle()
            origin.idle.append(conn)
        else:
            conn.abort()

    async def aclose(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            idle, origin.idle = origin.idle, []
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.abort()


def _request_bytes(
    method: str, target: bytes, host: bytes, headers: Headers, body: bytes
) -> tuple[bytes, bytes]:
    """(the request's head, its body): joined when small, so that one send carries both."""
    parts: list[Any] = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if body or method not in ("GET", "HEAD"):
        parts += (b"content-length: ", b"%d" % len(body), b"\r\n")
    parts.append(b"\r\n")
    if len(body) <= _ONE_WRITE:
        parts.append(body)
        return b"".join(parts), b""
    return b"".join(parts), body
