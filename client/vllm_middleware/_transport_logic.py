"""Capturing transports, written once for httpx and httpx2 (whose transport APIs are alike).

A capture transport wraps the transport an HTTP client already has (its pool limits, proxies
and TLS stay), hands each request to a `WireCapture`, and gives the response back as the server
sent it: same status, headers and bytes, the body passed on chunk by chunk as it arrives and
observed on the way. Errors of the HTTP layer are recorded and re-raised unchanged.

The classes here hold the logic; `_capture_transport` (httpx) and `httpx2` (httpx2) make the
public classes by mixing them with each library's own base classes, which the libraries check
with `isinstance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar, Protocol

from ._exceptions import APIError
from ._recorder import Recorder
from ._wire_capture import Exchange, WireCapture, transport_error
from ._wire_headers import CONTROL_HEADERS, HOST_HEADER, METADATA_HEADER, read_library_headers

__all__ = ["AsyncBodyLogic", "AsyncTransportLogic", "SyncBodyLogic", "SyncTransportLogic"]


class _URL(Protocol):
    path: str
    password: str | None

    def copy_with(self, **kwargs: Any) -> Any: ...


def _shown(url: _URL) -> str:
    return str(url.copy_with(password="***")) if url.password else str(url)


def _started(
    capture: WireCapture, request: Any, body: bytes, started: float
) -> tuple[Exchange | None, Any]:
    """Begin the record; remove our control headers from the request before it leaves."""
    headers = request.headers
    found = read_library_headers(headers)
    url = request.url
    exchange = capture.begin(request.method, url.path, found, body, started)
    if METADATA_HEADER in found or HOST_HEADER in found:
        for control in CONTROL_HEADERS:
            headers.pop(control, None)
    return exchange, url


def _failure(exchange: Exchange, exc: BaseException, url: Any, timeouts: tuple[type, ...]) -> None:
    if isinstance(exc, Exception):
        is_timeout = isinstance(exc, timeouts)
        exchange.fail(transport_error(exc, _shown(url), exchange.request_id, timeout=is_timeout))
    else:  # cancelled (asyncio, anyio, trio) or interrupted: not the server's doing
        error = APIError("cancelled by the caller before the response")
        exchange.fail(error, retried=False)


def _ended_by(exc: BaseException, exchange: Exchange, timeouts: tuple[type, ...]) -> None:
    """Record a body that stopped with `exc` while it was being read."""
    if isinstance(exc, GeneratorExit):
        # The iterator was let go: the caller closing the response says "closed", the
        # response being garbage-collected unclosed says "dropped".
        return
    if isinstance(exc, Exception):
        is_timeout = isinstance(exc, timeouts)
        error = transport_error(exc, "response body", exchange.request_id, timeout=is_timeout)
        exchange.finish("disconnected", error)
    else:
        message = "cancelled by the caller while the response was read"
        exchange.finish("cancelled", APIError(message, request_id=exchange.request_id))


def _observe(exchange: Exchange, response: Any) -> bool:
    """Show the response to the exchange; True if its body is still to come (to be wrapped).

    A transport may answer with the body already in memory (httpx reads a `content=` body at
    once, as `MockTransport` answers and caching transports do): it is recorded now, decoded.
    """
    headers = read_library_headers(response.headers)
    if not response.is_stream_consumed:
        exchange.respond(response.status_code, headers)
        return True
    headers.pop("content-encoding", None)
    exchange.complete(response.status_code, headers, response.content)
    return False


class SyncBodyLogic:
    """A response body passed through to the caller and shown to the exchange."""

    timeouts: ClassVar[tuple[type, ...]] = ()

    def __init__(self, inner: Any, exchange: Exchange) -> None:
        self._inner = inner
        self._exchange = exchange
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        exchange = self._exchange
        feed = exchange.feed
        try:
            for chunk in self._inner:
                feed(chunk)
                yield chunk
        except BaseException as exc:
            _ended_by(exc, exchange, self.timeouts)
            raise
        exchange.finish("done")

    def close(self) -> None:
        self._closed = True
        if not self._exchange.ended:
            self._exchange.finish("closed")
        self._inner.close()

    def __del__(self) -> None:
        # A response dropped unclosed (an SDK stream the caller forgot) is still recorded, and
        # its connection given back.
        exchange = self._exchange
        if not exchange.ended:
            exchange.finish("dropped")
        if not self._closed:
            with contextlib.suppress(Exception):
                self._inner.close()


_closing: set[asyncio.Task[None]] = set()  # closes of dropped responses, kept until done


async def _close_quietly(inner: Any) -> None:
    with contextlib.suppress(Exception):
        await inner.aclose()


class AsyncBodyLogic:
    """`SyncBodyLogic` for async clients."""

    timeouts: ClassVar[tuple[type, ...]] = ()

    def __init__(self, inner: Any, exchange: Exchange) -> None:
        self._inner = inner
        self._exchange = exchange
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        with contextlib.suppress(RuntimeError):  # another event loop library: no finalizer
            self._loop = asyncio.get_running_loop()
        feed = exchange.feed
        try:
            async for chunk in self._inner:
                feed(chunk)
                yield chunk
        except BaseException as exc:
            _ended_by(exc, exchange, self.timeouts)
            raise
        exchange.finish("done")

    async def aclose(self) -> None:
        self._closed = True
        if not self._exchange.ended:
            self._exchange.finish("closed")
        await self._inner.aclose()

    def __del__(self) -> None:
        exchange = self._exchange
        if not exchange.ended:
            exchange.finish("dropped")
        loop = self._loop
        if self._closed or loop is None or loop.is_closed():
            return
        # The connection is still checked out of the pool: close it on its loop.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_spawn_close, self._inner)


def _spawn_close(inner: Any) -> None:
    task = asyncio.ensure_future(_close_quietly(inner))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class _TransportBase:
    """What both transports keep: the inner transport, the capture, whether the recorder is
    theirs to close."""

    timeouts: ClassVar[tuple[type, ...]] = ()

    def __init__(
        self,
        transport: Any,
        recorder: Recorder | None,
        store_embeddings: bool,
        options: dict[str, Any],
    ) -> None:
        self._inner = transport
        self._owns_recorder = recorder is None
        if recorder is None:
            recorder = Recorder.open(owner=type(self).__name__, **options)
        elif options:
            raise TypeError(f"capture options given with a recorder: {sorted(options)}")
        self.capture = WireCapture(recorder, store_embeddings=store_embeddings)

    @property
    def recorder(self) -> Recorder:
        return self.capture.recorder

    @property
    def transport(self) -> Any:
        """The wrapped transport (the one that sends)."""
        return self._inner


class SyncTransportLogic(_TransportBase):
    body_class: ClassVar[type[SyncBodyLogic]] = SyncBodyLogic

    def handle_request(self, request: Any) -> Any:
        started = time.perf_counter()
        try:
            body = request.content
        except Exception:  # a streamed body (multipart upload): read it so it can be recorded
            body = request.read()
        exchange, url = _started(self.capture, request, body, started)
        if exchange is None:
            return self._inner.handle_request(request)
        try:
            response = self._inner.handle_request(request)
        except BaseException as exc:
            _failure(exchange, exc, url, self.timeouts)
            raise
        if _observe(exchange, response):
            response.stream = self.body_class(response.stream, exchange)
        return response

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            if self._owns_recorder:
                self.recorder.close()


class AsyncTransportLogic(_TransportBase):
    body_class: ClassVar[type[AsyncBodyLogic]] = AsyncBodyLogic

    async def handle_async_request(self, request: Any) -> Any:
        started = time.perf_counter()
        try:
            body = request.content
        except Exception:  # a streamed body (multipart upload): read it so it can be recorded
            body = await request.aread()
        exchange, url = _started(self.capture, request, body, started)
        if exchange is None:
            return await self._inner.handle_async_request(request)
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException as exc:
            _failure(exchange, exc, url, self.timeouts)
            raise
        if _observe(exchange, response):
            response.stream = self.body_class(response.stream, exchange)
        return response

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._owns_recorder:
                await self.recorder.aclose()
