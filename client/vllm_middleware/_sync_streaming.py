"""Sync streaming: the `Stream` that `SyncVLLMMiddleware` returns, reading the body for
`StreamCore` with blocking I/O.

Events, chunks, endings and the record are `StreamCore`'s, the same as the async stream's.
What differs is the waiting: a blocking read cannot be put under a timer of its own, so the
reads after [DONE] (the end of the body, kept for the connection's reuse) and the usage chunk
read when a finished stream is closed wait at most the client's read timeout, where the async
stream waits one second. vLLM ends the body right after [DONE].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import httpx

from ._exceptions import APIError
from ._stream_core import (
    Accumulator,
    StreamCore,
    StreamView,
    body_reading,
    log_unstarted,
    refused_stream,
)

if TYPE_CHECKING:
    from ._recorder import Call

__all__ = ["Stream", "SyncStreamState", "fail_before_sync_stream"]


def _body_bytes(response: httpx.Response) -> Iterator[bytes]:
    """The body as it arrives, as UTF-8 bytes (see `body_reading`)."""
    reading = body_reading(response)
    if reading == "raw":
        return response.iter_raw()
    if reading == "decoded":
        return response.iter_bytes()
    return (text.encode() for text in response.iter_text())


class SyncStreamState(StreamCore):
    """A sync stream's reading and closing around `StreamCore`, kept apart from `Stream` so
    its finalizer can use it."""

    __slots__ = ("body", "connected", "receive")

    def __init__(
        self,
        call: Call,
        started: float,
        response: httpx.Response,
        *,
        chat: bool,
        hide_usage: bool,
        acc: Accumulator | None = None,
    ) -> None:
        super().__init__(call, started, response, chat=chat, hide_usage=hide_usage, acc=acc)
        self.body = _body_bytes(response)
        self.receive = self.body.__next__
        self.connected = True

    def next_chunk(self) -> dict[str, Any]:
        """The next chunk for the caller; reads only as far as that needs (one event a time)."""
        ready = self.ready
        events = self.events
        try:
            while not ready:
                if self.done:
                    self.raise_end()
                    raise StopIteration
                if events:
                    self.handle(events.popleft())
                else:
                    try:
                        data = self.receive()
                    except StopIteration:
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
                    self._disconnect()
        except KeyboardInterrupt:
            # The sync form of a cancelled read: recorded as such, the connection closed.
            if self.cancel() and self.connected:
                self.connected = False
                self.close_transport()
            raise
        return ready.popleft()

    def _disconnect(self) -> None:
        """Give the connection back: after [DONE] only the body's end should be left to read."""
        if self.drain:
            try:
                for _ in self.body:  # bytes after [DONE]: skipped
                    pass
            except Exception:  # the connection is closed instead of reused
                pass
            else:
                if self.response.is_closed:  # httpx closes it when the body is read to the end
                    self.connected = False
                    return
        self.connected = False
        self.close_transport()

    def close_transport(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            self.response.close()

    def close(self) -> None:
        """The caller closed the stream (`close`, or leaving `with`)."""
        if self.done:
            if self.connected:
                self.connected = False
                self.close_transport()
            return
        if self.begin_close():
            with contextlib.suppress(Exception):  # StopIteration included: the end
                while True:
                    self.next_chunk()
        self.end_close()
        if self.connected:
            self.connected = False
            self.close_transport()

    def collect(self) -> None:
        """Finalizer: the stream object was garbage-collected without being closed.

        Its connection is not closed from here: the body's generators, collected with this
        state, give it back to the pool (httpcore closes a response whose body iterator is
        finalized), with no lock taken in a finalizer of ours.
        """
        self.collected()


class Stream(StreamView):
    """The chunks of one streaming call of `SyncVLLMMiddleware`, as parsed dicts, in the order
    the server sent them.

    Use as ``with client.chat_completion(..., stream=True) as stream:`` and
    ``for chunk in stream``. Exactly one record is logged when the stream ends: at ``[DONE]``,
    on an in-band error event (raised here as an `APIStatusError` subclass with
    ``in_stream=True``, after the chunks before it), on a dropped connection
    (`APIConnectionError`), when the caller closes it early or interrupts a read
    (KeyboardInterrupt), or when the object is garbage-collected unclosed (prefer closing it:
    that also frees the connection at once). One stream is read by one thread at a time.
    """

    _state: SyncStreamState

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        return self._state.next_chunk()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading, free the connection and log the record (idempotent)."""
        self._state.close()


def fail_before_sync_stream(call: Call, started: float, response: httpx.Response) -> NoReturn:
    """An HTTP error before the stream started: read the error body, log, raise."""
    read_error: httpx.HTTPError | None = None
    try:
        response.read()
    except httpx.HTTPError as exc:
        read_error = exc
    except KeyboardInterrupt:
        response.close()
        cancelled = APIError("cancelled by the caller before the response")
        log_unstarted(call, started, cancelled, "cancelled", response.status_code)
        raise
    response.close()
    raise refused_stream(call, started, response, read_error)
