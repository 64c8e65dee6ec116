"""Streaming responses: SSE parsing, reassembly of chunks, and the stream object callers iterate.

The caller gets every chunk as soon as its SSE event is complete; the record (one per request,
whatever ends the stream) holds the chunks folded back into the non-streaming response shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import httpx
import orjson

from ._exceptions import APIConnectionError, APIError, APIStatusError, status_error_class
from ._http import exception_from_response, exception_from_transport
from ._reassembly import SSEParser, StreamAccumulator

if TYPE_CHECKING:
    from ._call import Call

__all__ = ["AsyncStream", "StreamEnd", "StreamState", "error_from_event", "fail_before_stream"]

StreamEnd = Literal[
    "completed", "error_event", "disconnected", "abandoned", "cancelled", "protocol_error"
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


class StreamState:
    """Everything a stream needs, kept apart from `AsyncStream` so a finalizer can use it."""

    def __init__(
        self,
        call: Call,
        started: float,
        response: httpx.Response,
        *,
        chat: bool,
        hide_usage: bool,
        spawn: Spawn,
    ) -> None:
        self.call = call
        self.started = started
        self.response = response
        self.lines: AsyncIterator[str] = response.aiter_lines()
        self.parser = SSEParser()
        self.acc = StreamAccumulator(chat, started)
        self.hide_usage = hide_usage
        # With include_usage injected, vLLM moves system_fingerprint from the finish chunks to
        # the usage chunk; finish chunks wait for it so the caller sees what it asked for.
        self.hold_finish = hide_usage and chat
        self.held: list[dict[str, Any]] = []
        self.ready: deque[dict[str, Any]] = deque()
        self.pending_error: APIError | None = None
        self.discard = False
        self.done = False
        self.logged = False
        self.spawn = spawn
        self.loop = asyncio.get_running_loop()

    # -- iteration --------------------------------------------------------------------------
    async def next_chunk(self) -> dict[str, Any]:
        while True:
            if self.ready:
                return self.ready.popleft()
            if self.pending_error is not None:
                error, self.pending_error = self.pending_error, None
                raise error
            if self.done:
                raise StopAsyncIteration
            try:
                await self._read()
            except asyncio.CancelledError:
                message = f"cancelled by the caller after {self.acc.chunks} chunks"
                await self._finish("cancelled", APIError(message, request_id=self._rid))
                self.ready.clear()
                raise

    @property
    def _rid(self) -> str:
        return self.call.request_id

    async def _read(self) -> None:
        """Read until a chunk is ready for the caller or the stream ended."""
        parser = self.parser
        try:
            while not self.done and not self.ready:
                try:
                    line = await anext(self.lines)
                except StopAsyncIteration:
                    data = parser.flush()
                    if data is not None:
                        await self._handle(data)
                    if not self.done:
                        await self._ended_early()
                    return
                data = parser.feed(line)
                if data is not None:
                    await self._handle(data)
        except httpx.HTTPError as exc:
            await self._finish("disconnected", exception_from_transport(exc, self._rid))

    async def _ended_early(self) -> None:
        if self.acc.all_finished():  # a server that does not send [DONE]
            await self._finish("completed", None)
            return
        error = APIConnectionError("stream ended before [DONE]", request_id=self._rid)
        await self._finish("disconnected", error)

    async def _handle(self, data: str) -> None:
        if data == "[DONE]":
            await self._finish("completed", None, drain=True)
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            error = APIError(f"invalid JSON in stream: {exc}", request_id=self._rid)
            await self._finish("protocol_error", error)
            return
        if not isinstance(chunk, dict):
            error = APIError("stream event is not a JSON object", request_id=self._rid)
            await self._finish("protocol_error", error)
            return
        if "error" in chunk and "choices" not in chunk:
            await self._finish("error_event", error_from_event(chunk, self._rid), drain=True)
            return
        self.acc.add(chunk)
        if self.discard:
            return
        choices = chunk.get("choices")
        if self.hide_usage and choices == []:
            self._release_held(chunk.get("system_fingerprint"))
            return
        if self.hold_finish and choices and _has_finish(choices):
            self.held.append(chunk)
            return
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
    async def _finish(self, end: StreamEnd, error: APIError | None, *, drain: bool = False) -> None:
        """End the stream once: record it, then give the connection back."""
        if self.done:
            return
        self.done = True
        self._release_held(None)
        self._log(end, error)
        if error is not None and end not in ("cancelled", "abandoned"):
            self.pending_error = error
        if drain:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_DRAIN_TIMEOUT):
                    async for _ in self.lines:
                        pass
        await self.close_transport()

    async def close_transport(self) -> None:
        with contextlib.suppress(Exception):
            await self.lines.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await self.response.aclose()

    async def close(self) -> None:
        """The caller closed the stream (`aclose`, or leaving `async with`)."""
        if self.done:
            await self.close_transport()
            return
        if self.acc.all_finished():
            self.discard = True
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_FINISHED_CLOSE_TIMEOUT):
                    while not self.done:
                        await self._read()
            self.pending_error = None
        if not self.done:
            message = f"stream closed by the caller after {self.acc.chunks} chunks"
            await self._finish("abandoned", APIError(message, request_id=self._rid))
        self.ready.clear()

    def collect(self) -> None:
        """Finalizer: the stream object was garbage-collected without being closed."""
        if self.done:
            return
        self.done = True
        message = f"stream garbage-collected unclosed after {self.acc.chunks} chunks"
        self._log("abandoned", APIError(message, request_id=self._rid))
        # The connection is still checked out of the pool: close it on the loop.
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
            call.client._logging_failed(call.request_id)


def _has_finish(choices: list[Any]) -> bool:
    return any(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)


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
        finalizer = weakref.finalize(self, state.collect)
        finalizer.atexit = False

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

    async def __anext__(self) -> dict[str, Any]:
        return await self._state.next_chunk()

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
        call.log(started, error=cancelled, status_code=response.status_code, stream=True)
        raise
    await response.aclose()
    call.log(started, error=failure, status_code=response.status_code, stream=True)
    raise failure
