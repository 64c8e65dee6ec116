"""The proxy's connections to its upstreams: an httpx transport with an O(1) keep-alive pool.

httpx's own transport hands each request to httpcore's pool, which walks every connection for
every queued request (and asks the kernel whether each idle socket is readable): fine for an
app with a few connections, quadratic for a proxy with dozens in use. Profiled at 64 concurrent
requests it was most of the proxy's CPU. Here each origin keeps a stack of idle connections: a
request takes the most recently used one (its socket is the likeliest to be alive and warm),
checks only that one for expiry, and gives it back when its response is closed.

Connections are httpcore's own (`AsyncHTTPConnection`: HTTP/1.1, TLS, timeouts as httpx
does them); errors are raised as httpx's exceptions, so the capture transport above and the
proxy see exactly what httpx's transport would raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpcore
import httpx

__all__ = ["UpstreamPool"]

# httpcore's exceptions and httpx's, most specific first (subclasses before their bases).
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _as_httpx(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, mapped in _ERRORS:
            if isinstance(exc, core):
                raise mapped(str(exc) or type(exc).__name__, request=request) from exc
        raise


class _Origin:
    """The idle connections to one scheme://host:port."""

    __slots__ = ("idle", "key")

    def __init__(self, key: httpcore.Origin) -> None:
        self.key = key
        self.idle: list[httpcore.AsyncHTTPConnection] = []


class _PooledBody(httpx.AsyncByteStream):
    """A response body that gives its connection back to the pool when closed."""

    __slots__ = ("_conn", "_inner", "_origin", "_pool", "_released", "_request")

    def __init__(
        self,
        inner: Any,
        conn: httpcore.AsyncHTTPConnection,
        origin: _Origin,
        pool: UpstreamPool,
        request: httpx.Request,
    ) -> None:
        self._inner = inner
        self._conn = conn
        self._origin = origin
        self._pool = pool
        self._request = request
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx(self._request):
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            with _as_httpx(self._request):
                await self._inner.aclose()  # a body read to its end leaves the connection idle
        finally:
            self._pool.give_back(self._origin, self._conn)


class UpstreamPool(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive connections to any number of origins, at most `max_connections`
    in use at once (a request waits up to the `pool` timeout for one)."""

    def __init__(
        self,
        *,
        max_connections: int = 1000,
        max_idle_per_origin: int = 1000,
        keepalive_expiry: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._origins: dict[tuple[bytes, bytes, int | None], _Origin] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle_per_origin
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    def _origin(self, url: httpx.URL) -> _Origin:
        key = (url.raw_scheme, url.raw_host, url.port)
        origin = self._origins.get(key)
        if origin is None:
            port = url.port or (443 if url.raw_scheme == b"https" else 80)
            origin = _Origin(httpcore.Origin(url.raw_scheme, url.raw_host, port))
            self._origins[key] = origin
        return origin

    def _checkout(self, origin: _Origin) -> httpcore.AsyncHTTPConnection:
        idle = origin.idle
        while idle:
            conn = idle.pop()
            if conn.is_available() and not conn.has_expired():
                return conn
            _close_later(conn)
        ssl_context = self._ssl() if origin.key.scheme == b"https" else None
        return httpcore.AsyncHTTPConnection(
            origin.key, ssl_context=ssl_context, keepalive_expiry=self._keepalive_expiry
        )

    def give_back(self, origin: _Origin, conn: httpcore.AsyncHTTPConnection) -> None:
        self._slots.release()
        if not self._closed and conn.is_idle() and len(origin.idle) < self._max_idle:
            origin.idle.append(conn)
        else:
            _close_later(conn)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        origin = self._origin(url)
        with _as_httpx(request):
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpcore.PoolTimeout("no upstream connection free in time") from None
        core_request = httpcore.Request(
            request.method,
            httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        conn = self._checkout(origin)
        try:
            with _as_httpx(request):
                response = await conn.handle_async_request(core_request)
        except BaseException:
            self._slots.release()
            _close_later(conn)
            raise
        body = _PooledBody(response.stream, conn, origin, self, request)
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=body,
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            idle, origin.idle = origin.idle, []
            for conn in idle:
                with contextlib.suppress(Exception):
                    await conn.aclose()


_closing: set[asyncio.Task[None]] = set()


def _close_later(conn: httpcore.AsyncHTTPConnection) -> None:
    """Close a connection without waiting for it (a dead socket's close never blocks)."""

    async def close() -> None:
        with contextlib.suppress(Exception):
            await conn.aclose()

    task = asyncio.get_running_loop().create_task(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)
