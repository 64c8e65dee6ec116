"""Async streaming: the stream object callers iterate, reading the body for `StreamCore`.

The caller gets every chunk as soon as its SSE event is complete; the record (one per request,
whatever ends the stream) holds the chunks folded back into the non-streaming response shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from ._exceptions import APIError
from ._stream_core import (
    Accumulator,
    StreamCore,
    StreamEnd,
    StreamView,
    body_reading,
    error_from_event,
    log_unstarted,
    refused_stream,
)

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

# After [DONE] or an error event only the chunked-encoding terminator should be left; reading
# it returns the connection to the pool. A server that keeps the stream open gets cut instead.
_DRAIN_TIMEOUT = 1.0
# When the caller closes a stream whose choices have all finished, only the usage chunk and
# [DONE] are missing: wait this long for them so the record is complete.
_FINISHED_CLOSE_TIMEOUT = 1.0

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def _body_bytes(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it arrives, as UTF-8 bytes (see `body_reading`)."""
    reading = body_reading(response)
    if reading == "raw":
        return response.aiter_raw()
    if reading == "decoded":
        return response.aiter_bytes()
    return _reencoded(response)


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


class StreamState(StreamCore):
    """An async stream's reading and closing around `StreamCore`, kept apart from
    `AsyncStream` so a finalizer can use it."""

    __slots__ = ("body", "connected", "loop", "receive", "spawn")

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
        super().__init__(call, started, response, chat=chat, hide_usage=hide_usage, acc=acc)
        self.body = _body_bytes(response)
        self.receive = self.body.__anext__
        self.connected = True
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
                    self.raise_end()
                    raise StopAsyncIteration
                if events:
                    self.handle(events.popleft())
                else:
                    try:
                        data = await self.receive()
                    except StopAsyncIteration:
                        self.body_ended()
                    except httpx.HTTPError as exc:
                        self.transport_failed(exc)
                    else:
                        fresh = self.decoder.feed(data)
                        if len(fresh) == 1:
                            self.handle(fresh[0])
                        else:
                            events.extend(fresh)
                if self.done and self.connected:
                    await self._disconnect()
        except asyncio.CancelledError:
            # In close() the wait is cancelled by its own timeout: close() records the end.
            if self.cancel() and self.connected:
                self.connected = False
                await self.close_transport()
            raise
        return ready.popleft()

    # -- ending -----------------------------------------------------------------------------
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
        if self.begin_close():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_FINISHED_CLOSE_TIMEOUT):
                    while True:
                        await self.next_chunk()
        self.end_close()
        if self.connected:
            self.connected = False
            await self.close_transport()

    def collect(self) -> None:
        """Finalizer: the stream object was garbage-collected without being closed."""
        self.collected()
        if not self.connected:
            return
        # The connection is still checked out of the pool: close it on the loop.
        self.connected = False
        loop = self.loop
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.spawn, self.close_transport())


class AsyncStream(StreamView):
    """The chunks of one streaming call, as parsed dicts, in the order the server sent them.

    Use as ``async with await client.chat_completion(..., stream=True) as stream:`` and
    ``async for chunk in stream``. Exactly one record is logged when the stream ends: at
    ``[DONE]``, on an in-band error event (raised here as an `APIStatusError` subclass with
    ``in_stream=True``, after the chunks before it), on a dropped connection
    (`APIConnectionError`), when the caller closes it early or is cancelled, or when the object
    is garbage-collected unclosed (prefer closing it: that also frees the connection at once).
    """

    _state: StreamState

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
    read_error: httpx.HTTPError | None = None
    try:
        await response.aread()
    except httpx.HTTPError as exc:
        read_error = exc
    except asyncio.CancelledError:
        await response.aclose()
        cancelled = APIError("cancelled by the caller before the response")
        log_unstarted(call, started, cancelled, "cancelled", response.status_code)
        raise
    await response.aclose()
    raise refused_stream(call, started, response, read_error)
