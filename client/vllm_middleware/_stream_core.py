"""What a streamed reply means, apart from how its bytes are read: SSE events in, chunks for the
caller out, one record when the stream ends.

`StreamCore` does no I/O, so the async stream (`_streaming.StreamState`) and the sync one
(`_sync_streaming.SyncStreamState`) extend it with their own reading and closing, and both
write the same record for the same bytes.
"""

from __future__ import annotations

import codecs
from collections import deque
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
    "BodyReading",
    "StreamCore",
    "StreamEnd",
    "StreamView",
    "body_reading",
    "error_from_event",
    "log_unstarted",
    "refused_stream",
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


class Accumulator(Protocol):
    """What a stream's events are folded by (`StreamAccumulator`, `ResponsesAccumulator`)."""

    chunks: int
    ttft_ms: float | None

    def add(self, chunk: dict[str, Any]) -> bool: ...

    def all_finished(self) -> bool: ...

    def response(self) -> Any: ...


#: How a body is read: "raw" (UTF-8 as sent: the fewest layers), "decoded" (decompressed, or
#: already in memory), "text" (another charset: decoded by httpx, then re-encoded as UTF-8).
BodyReading = Literal["raw", "decoded", "text"]


def body_reading(response: httpx.Response) -> BodyReading:
    """How to read this body as UTF-8 bytes, through as few of httpx's layers as will do."""
    if not _is_utf8(response):
        return "text"
    if response.headers.get("content-encoding") is not None or response.is_stream_consumed:
        return "decoded"
    return "raw"


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


class StreamCore:
    """A stream's state and decisions (see the module docstring); subclasses read the body,
    feed its events to `handle` (or `body_ended` / `transport_failed`), hand the caller the
    `ready` chunks, and give the connection back once `done`."""

    __slots__ = (
        "acc",
        "call",
        "decoder",
        "discard",
        "done",
        "drain",
        "events",
        "held",
        "hide_usage",
        "logged",
        "pending_error",
        "ready",
        "response",
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
        acc: Accumulator | None = None,
    ) -> None:
        self.call = call
        self.started = started
        self.response = response
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
        self.discard = False  # the caller closed a finished stream: read on, hand out nothing
        self.done = False
        self.drain = False  # read the rest of the body before closing (keeps the connection)
        self.logged = False

    @property
    def _rid(self) -> str:
        return self.call.request_id

    # -- events -----------------------------------------------------------------------------
    def handle(self, data: bytes) -> None:
        """One SSE event's payload: a chunk for the caller, the end, or an error."""
        if data == b"[DONE]":
            self.settle("completed", None, drain=True)
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            # What httpx's text decoding hands on: invalid UTF-8 replaced, not an error.
            try:
                chunk = orjson.loads(data.decode("utf-8", "replace"))
            except orjson.JSONDecodeError as exc:
                error = APIError(f"invalid JSON in stream: {exc}", request_id=self._rid)
                self.settle("protocol_error", error)
                return
        if not isinstance(chunk, dict):
            error = APIError("stream event is not a JSON object", request_id=self._rid)
            self.settle("protocol_error", error)
            return
        if "error" in chunk and "choices" not in chunk:
            self.settle("error_event", error_from_event(chunk, self._rid), drain=True)
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

    def body_ended(self) -> None:
        """The body ended: its last events, then the end of a stream that did not say so."""
        for event in self.decoder.close():
            self.handle(event)
        if self.done:
            return
        if self.acc.all_finished():  # a server that does not send [DONE]
            self.settle("completed", None)
            return
        error = APIConnectionError("stream ended before [DONE]", request_id=self._rid)
        self.settle("disconnected", error)

    def transport_failed(self, exc: httpx.HTTPError) -> None:
        self.settle("disconnected", exception_from_transport(exc, self._rid))

    def raise_end(self) -> None:
        """The stream is done and every chunk handed out: raise its error, if it ended on one
        (once); the caller then stops iterating."""
        if self.pending_error is not None:
            error, self.pending_error = self.pending_error, None
            raise error

    # -- ending -----------------------------------------------------------------------------
    def settle(self, end: StreamEnd, error: APIError | None, *, drain: bool = False) -> None:
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

    def cancel(self) -> bool:
        """The caller interrupted a read (cancelled, or a KeyboardInterrupt): recorded, unless
        the read was a close's own bounded wait. True when the connection should be closed."""
        if self.discard:
            return False
        message = f"cancelled by the caller after {self.acc.chunks} chunks"
        self.settle("cancelled", APIError(message, request_id=self._rid))
        self.ready.clear()
        return True

    def begin_close(self) -> bool:
        """The caller closes an unfinished stream. True when every choice has finished: then
        only the usage chunk and [DONE] are missing, and reading them (chunks discarded)
        makes the record whole."""
        if self.acc.all_finished():
            self.discard = True
            return True
        return False

    def end_close(self) -> None:
        """After `begin_close` and any reading: a stream still unfinished was abandoned."""
        if self.discard:
            self.pending_error = None  # read after the caller closed: nobody to raise it to
        if not self.done:
            message = f"stream closed by the caller after {self.acc.chunks} chunks"
            self.settle("abandoned", APIError(message, request_id=self._rid))
        self.ready.clear()

    def collected(self) -> None:
        """Finalizer: the stream object was garbage-collected without being closed."""
        if not self.done:
            self.done = True
            message = f"stream garbage-collected unclosed after {self.acc.chunks} chunks"
            self._log("abandoned", APIError(message, request_id=self._rid))

    def _log(self, end: StreamEnd, error: APIError | None) -> None:
        if self.logged:
            return
        self.logged = True
        call = self.call
        if call.recorder.sink is None:
            return  # logging off: no record, so no reply to rebuild for it
        acc = self.acc
        try:
            response = acc.response()
            call.log(
                self.started,
                response=response,
                error=error,
                status_code=self.response.status_code,
                stream=True,
                ttft_ms=acc.ttft_ms,
                # `StreamAccumulator` says after `response()` whether it holds audio (the
                # one place a reply's blob can be); other accumulators' replies are walked.
                reply_bytes=None if getattr(acc, "may_hold_media", True) else 0,
                chunks=acc.chunks,
                stream_end=end,
            )
        except Exception:  # a logging failure never reaches the caller
            call.recorder.logging_failed(call.request_id)


def refused_stream(
    call: Call, started: float, response: httpx.Response, read_error: httpx.HTTPError | None
) -> APIError:
    """An error status before the stream started (its body read, or failing with
    `read_error`): the exception to raise, recorded."""
    failure: APIError
    if read_error is None:
        failure = exception_from_response(response, call.request_id)
    else:
        failure = exception_from_transport(read_error, call.request_id)
    log_unstarted(call, started, failure, "http_error", response.status_code)
    return failure


def log_unstarted(
    call: Call,
    started: float,
    error: APIError | InvalidRequestError,
    end: StreamEnd,
    status_code: int | None = None,
) -> None:
    """Record a stream that never delivered a chunk (it still says how it ended)."""
    call.log(
        started,
        error=error,
        status_code=status_code,
        stream=True,
        reply_bytes=0,  # no reply
        chunks=0,
        stream_end=end,
    )


class _ViewedState(Protocol):
    done: bool
    connected: bool
    response: httpx.Response

    @property
    def call(self) -> Call: ...

    def collect(self) -> None: ...


class StreamView:
    """What a stream object shows of its state, sync or async, and its finalizer."""

    _state: _ViewedState

    def __init__(self, state: _ViewedState) -> None:
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
