"""Streaming responses: SSE parsing, reassembly of chunks, and the stream object callers iterate.

The caller gets every chunk as soon as its SSE event is complete; the record (one per request,
whatever ends the stream) holds the chunks folded back into the non-streaming response shape.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import types
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

import httpx
import orjson

from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    InvalidRequestError,
    status_error_class,
)
from ._http import exception_from_response, exception_from_transport
from ._reassembly import SSEDecoder, StreamAccumulator

if TYPE_CHECKING:
    from ._recorder import Call

__all__ = [
    "Accumulator",
    "AsyncStream",
    "StreamEnd",
    "StreamState",
    "error_from_event",
    "fail_before_stream",
    "log_unstarted",
]

StreamEnd = Literal[
    "completed",
    "error_event",
    "disconnected",
    "abandoned",
    "cancelled",
    "protocol_error",
    "http_error",
    "invalid_request",
]

# After [DONE] or an error event only the chunked-encoding terminator should be left; reading
# it returns the connection to the pool. A server that keeps the stream open gets cut instead.
_DRAIN_TIMEOUT = 1.0
# When the caller closes a stream whose choices have all finished, only the usage chunk and
# [DONE] are missing: wait this long for them so the record is complete.
_FINISHED_CLOSE_TIMEOUT = 1.0


def error_from_event(body: dict[str, Any], request_id: str) -> APIStatusError:
    """The exception for an in-band `{"error": ...}` event (the HTTP status was already 200)."""
    inner = body.get("error")
    message: str
    error_type = param = None
    code: Any = None
    if isinstance(inner, dict):
        message = str(inner.get("message") or "")
        error_type = None if inner.get("type") is None else str(inner["type"])
        param = None if inner.get("param") is None else str(inner["param"])
        code = inner.get("code")
    else:
        message = str(inner)
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    return status_error_class(status)(
        message,
        status_code=status,
        error_type=error_type,
        param=param,
        body=body,
        request_id=request_id,
        in_stream=True,
    )


Spawn = Callable[[Coroutine[Any, Any, None]], None]


class Accumulator(Protocol):
    """What a stream's events are folded by (`StreamAccumulator`, `ResponsesAccumulator`)."""

    chunks: int
    ttft_ms: float | None

    def add(self, chunk: dict[str, Any]) -> bool: ...

    def all_finished(self) -> bool: ...

    def response(self) -> Any: ...


def _body_bytes(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it arrives, as UTF-8 bytes, through as few of httpx's layers as will do."""
    headers = response.headers
    if not _is_utf8(response):
        return _reencoded(response)
    if headers.get("content-encoding") is not None or response.is_stream_consumed:
        return response.aiter_bytes()  # decompressed, or the body already read into memory
    return response.aiter_raw()


def _is_utf8(response: httpx.Response) -> bool:
    """Whether httpx would decode this body as UTF-8.

    `response.encoding` parses the header with the email package, slowly: the usual headers
    are decided here without it.
    """
    content_type = response.headers.get("content-type", "").lower()
    if "charset" not in content_type:
        if response.default_encoding == "utf-8":
            return True
    elif content_type.endswith("charset=utf-8") and content_type.count("charset") == 1:
        return True
    return codecs.lookup(response.encoding or "utf-8").name == "utf-8"


async def _reencoded(response: httpx.Response) -> AsyncIterator[bytes]:
    async for text in response.aiter_text():
        yield text.encode()


@types.coroutine
def _resume(step: Any, yielded: Any) -> Generator[Any, Any, Any]:
    """Await the rest of `step`, an awaitable already driven until it first yielded `yielded`.

    This lets a read be tried without a timer and put under one only when it has to wait.
    """
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # cancellation and close go to the read, as in an await
            try:
                yielded = step.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = step.send(sent)
            except StopIteration as stop:
                return stop.value


# Tasks releasing connections, kept alive until they end (the loop holds tasks weakly).
_RELEASING: set[asyncio.Task[None]] = set()


async def _uncut(release: Coroutine[Any, Any, None]) -> None:
    """Run a connection's release in a task of its own and wait for it.

    A cancellation of the caller must not land inside it: httpcore marks its stream closed
    before it gives the connection back to the pool, across awaits, so a release cut short
    leaves the connection checked out for good (the pool shrinks by one per such cancel). The
    caller's cancel still ends the wait at once; the release finishes in the background.
    """
    task = asyncio.get_running_loop().create_task(release)
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)
    await asyncio.shield(task)


class StreamState:
    """Everything a stream needs, kept apart from `AsyncStream` so a finalizer can use it."""

    __slots__ = (
        "acc",
        "body",
        "call",
        "connected",
        "decoder",
        "discard",
        "done",
        "drain",
        "events",
        "held",
        "hide_usage",
        "logged",
        "loop",
        "pending_error",
        "ready",
        "receive",
        "response",
        "spawn",
        "started",
    )

    def __init__(
        self,
        call: Call,
        started: float,
        response: httpx.Response,
        *,
        chat: bool,
        hide_usage: bool,
        spawn: Spawn,
        acc: Accumulator | None = None,
    ) -> None:
        self.call = call
        self.started = started
        self.response = response
        self.body = _body_bytes(response)
        self.receive = self.body.__anext__
        self.decoder = SSEDecoder()
        self.events: deque[bytes] = deque()  # payloads received but not handled yet
        if acc is None:
            choice = call.params.get("tool_choice") if chat else None
            forced = choice == "required" or isinstance(choice, dict)
            acc = StreamAccumulator(chat, started, forced)
        self.acc = acc
        # With include_usage injected, vLLM moves system_fingerprint from the finish chunks to
        # the usage chunk; finish chunks wait for it so the caller sees what it asked for.
        self.hide_usage = hide_usage
        self.held: list[dict[str, Any]] = []
        self.ready: deque[dict[str, Any]] = deque()
        self.pending_error: APIError | None = None
        self.discard = False
        self.done = False
        self.drain = False  # read the rest of the body before closing (keeps the connection)
        self.connected = True
        self.logged = False
        self.spawn = spawn
        self.loop = asyncio.get_running_loop()

    # -- iteration --------------------------------------------------------------------------
    async def next_chunk(self) -> dict[str, Any]:
        """The next chunk for the caller; reads only as far as that needs (one event a time)."""
        ready = self.ready
        events = self.events
        try:
            while not ready:
                if self.done:
                    if self.pending_error is not None:
                        error, self.pending_error = self.pending_error, None
                        raise error
                    raise StopAsyncIteration
                if events:
                    self._handle(events.popleft())
                else:
                    try:
                        data = await self.receive()
                    except StopAsyncIteration:
                        for event in self.decoder.close():
                            self._handle(event)
                        if not self.done:
                            self._ended_early()
                    except httpx.HTTPError as exc:
                        error = exception_from_transport(exc, self._rid)
                        self._settle("disconnected", error)
                    else:
                        fresh = self.decoder.feed(data)
                        if len(fresh) == 1:
                            self._handle(fresh[0])
                        else:
                            events.extend(fresh)
                if self.done and self.connected:
                    await self._disconnect()
        except asyncio.CancelledError:
            # In close() the wait is cancelled by its own timeout: close() records the end.
            if not self.discard:
                message = f"cancelled by the caller after {self.acc.chunks} chunks"
                self._settle("cancelled", APIError(message, request_id=self._rid))
                self.ready.clear()
                if self.connected:
                    self.connected = False
                    await self.close_transport()
            raise
        return ready.popleft()

    @property
    def _rid(self) -> str:
        return self.call.request_id

    def _ended_early(self) -> None:
        if self.acc.all_finished():  # a server that does not send [DONE]
            self._settle("completed", None)
            return
        error = APIConnectionError("stream ended before [DONE]", request_id=self._rid)
        self._settle("disconnected", error)

    def _handle(self, data: bytes) -> None:
        if data == b"[DONE]":
            self._settle("completed", None, drain=True)
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            # What httpx's text decoding hands on: invalid UTF-8 replaced, not an error.
            try:
                chunk = orjson.loads(data.decode("utf-8", "replace"))
            except orjson.JSONDecodeError as exc:
                error = APIError(f"invalid JSON in stream: {exc}", request_id=self._rid)
                self._settle("protocol_error", error)
                return
        if not isinstance(chunk, dict):
            error = APIError("stream event is not a JSON object", request_id=self._rid)
            self._settle("protocol_error", error)
            return
        if "error" in chunk and "choices" not in chunk:
            self._settle("error_event", error_from_event(chunk, self._rid), drain=True)
            return
        finished = self.acc.add(chunk)
        if self.discard:
            return
        if self.hide_usage:
            choices = chunk.get("choices")
            if not choices and isinstance(choices, list):
                self._release_held(chunk.get("system_fingerprint"))
                return
            if "usage" in chunk:
                del chunk["usage"]  # continuous stats come only with include_usage
            if finished:
                self.held.append(chunk)
                return
        if self.held:
            self._release_held(None)
        self.ready.append(chunk)

    def _release_held(self, fingerprint: Any) -> None:
        if not self.held:
            return
        for chunk in self.held:
            if fingerprint is not None:
                chunk["system_fingerprint"] = fingerprint
            self.ready.append(chunk)
        self.held = []

    # -- ending -----------------------------------------------------------------------------
    def _settle(self, end: StreamEnd, error: APIError | None, *, drain: bool = False) -> None:
        """End the stream once and record it; the connection is given back by the caller."""
        if self.done:
            return
        self.done = True
        self.drain = drain
        self.events.clear()
        self._release_held(None)
        self._log(end, error)
        if error is not None and end not in ("cancelled", "abandoned"):
            self.pending_error = error

    async def _disconnect(self) -> None:
        await _uncut(self._release())

    async def _release(self) -> None:
        """Give the connection back: after [DONE] only the body's end should be left to read."""
        if self.drain:
            try:
                await self._drain()
            except Exception:  # the connection is closed instead of reused
                pass
            else:
                if self.response.is_closed:  # httpx closes it when the body is read to the end
                    self.connected = False
                    return
        self.connected = False
        await self._close_transport()

    async def _drain(self) -> None:
        # Usually the end of the body is already here: try a read without arming a timer (a
        # timer costs more than the rest of the drain), and bound it only if it has to wait.
        while True:
            step: Any = self.receive()  # an async generator's step: a coroutine-like object
            try:
                yielded = step.send(None)
            except StopIteration:
                continue  # bytes after [DONE]: skipped
            except StopAsyncIteration:
                return
            break
        # A server that keeps the stream open gets cut instead.
        async with asyncio.timeout(_DRAIN_TIMEOUT):
            with contextlib.suppress(StopAsyncIteration):
                await _resume(step, yielded)
                async for _ in self.body:
                    pass

    async def close_transport(self) -> None:
        await _uncut(self._close_transport())

    async def _close_transport(self) -> None:
        with contextlib.suppress(Exception):
            await self.body.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await self.response.aclose()

    async def close(self) -> None:
        """The caller closed the stream (`aclose`, or leaving `async with`)."""
        if self.done:
            if self.connected:
                self.connected = False
                await self.close_transport()
            return
        if self.acc.all_finished():
            # Only the usage chunk and [DONE] are missing: read them so the record is whole.
            self.discard = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_FINISHED_CLOSE_TIMEOUT):
                    while True:
                        await self.next_chunk()
            self.pending_error = None
        if not self.done:
            message = f"stream closed by the caller after {self.acc.chunks} chunks"
            self._settle("abandoned", APIError(message, request_id=self._rid))
        if self.connected:
            self.connected = False
            await self.close_transport()
        self.ready.clear()

    def collect(self) -> None:
        """Finalizer: the stream object was garbage-collected without being closed."""
        if not self.done:
            self.done = True
            message = f"stream garbage-collected unclosed after {self.acc.chunks} chunks"
            self._log("abandoned", APIError(message, request_id=self._rid))
        if not self.connected:
            return
        # The connection is still checked out of the pool: close it on the loop.
        self.connected = False
        loop = self.loop
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.spawn, self.close_transport())

    def _log(self, end: StreamEnd, error: APIError | None) -> None:
        if self.logged:
            return
        self.logged = True
        call = self.call
        try:
            call.log(
                self.started,
                response=self.acc.response(),
                error=error,
                status_code=self.response.status_code,
                stream=True,
                ttft_ms=self.acc.ttft_ms,
                extra={"chunks": self.acc.chunks, "stream_end": end},
            )
        except Exception:  # a logging failure never reaches the caller
            call.recorder.logging_failed(call.request_id)


class AsyncStream:
    """The chunks of one streaming call, as parsed dicts, in the order the server sent them.

    Use as ``async with await client.chat_completion(..., stream=True) as stream:`` and
    ``async for chunk in stream``. Exactly one record is logged when the stream ends: at
    ``[DONE]``, on an in-band error event (raised here as an `APIStatusError` subclass with
    ``in_stream=True``, after the chunks before it), on a dropped connection
    (`APIConnectionError`), when the caller closes it early or is cancelled, or when the object
    is garbage-collected unclosed (prefer closing it: that also frees the connection at once).
    """

    def __init__(self, state: StreamState) -> None:
        self._state = state

    def __del__(self) -> None:
        # A stream dropped unclosed is still logged and its connection freed (a `__del__`
        # costs a fraction of a `weakref.finalize` per stream).
        state = self._state
        if not state.done or state.connected:
            state.collect()

    @property
    def request_id(self) -> str:
        """The middleware's record id for this call."""
        return self._state.call.request_id

    @property
    def response(self) -> httpx.Response:
        """The underlying HTTP response (status and headers; the body is the stream)."""
        return self._state.response

    @property
    def closed(self) -> bool:
        return self._state.done

    def __aiter__(self) -> AsyncStream:
        return self

    def __anext__(self) -> Awaitable[dict[str, Any]]:
        return self._state.next_chunk()  # no coroutine of its own: one frame less per chunk

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop reading, free the connection and log the record (idempotent)."""
        await self._state.close()

    close = aclose


async def fail_before_stream(call: Call, started: float, response: httpx.Response) -> None:
    """An HTTP error before the stream started: read the error body, log, raise."""
    failure: APIError
    try:
        await response.aread()
        failure = exception_from_response(response, call.request_id)
    except httpx.HTTPError as exc:
        failure = exception_from_transport(exc, call.request_id)
    except asyncio.CancelledError:
        await response.aclose()
        cancelled = APIError("cancelled by the caller before the response")
        log_unstarted(call, started, cancelled, "cancelled", response.status_code)
        raise
    await response.aclose()
    log_unstarted(call, started, failure, "http_error", response.status_code)
    raise failure


def log_unstarted(
    call: Call,
    started: float,
    error: APIError | InvalidRequestError,
    end: StreamEnd,
    status_code: int | None = None,
) -> None:
    """Record a stream that never delivered a chunk (it still says how it ended)."""
    extra = {"chunks": 0, "stream_end": end}
    call.log(started, error=error, status_code=status_code, stream=True, extra=extra)
