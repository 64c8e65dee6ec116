"""Capture from HTTP facts: one request and its response, as bytes, become one record.

The doors that see traffic rather than Python arguments (the `openai` SDK transports, the
logging proxy) share this core. A door calls `WireCapture.begin` with the request (method,
path, headers, body bytes), then tells the returned `Exchange` what came back: the status and
headers (`respond`), every body chunk as it passes to its caller (`feed`), and how the body
ended (`finish`); or that no response came (`fail`). The exchange writes exactly one record.

Nothing here reads the network or raises to the door: bad metadata headers, bodies that are
not JSON and unknown routes are recorded as they are. Headers are read only by name
(`_wire_headers.READ_HEADERS`): `Authorization` and API keys never reach a record.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ._endpoint_calls import summarize_embeddings
from ._exceptions import APIConnectionError, APIError, APITimeoutError, status_error_class
from ._http import parse_error_body
from ._partition import host_problem
from ._reassembly import SSEDecoder, StreamAccumulator
from ._responses_reassembly import ResponsesAccumulator
from ._streaming import Accumulator, StreamEnd, error_from_event
from ._wire_body import RetryLinks, decode_body, endpoint_of
from ._wire_headers import (
    HOST_HEADER,
    IDEMPOTENCY_HEADER,
    METADATA_HEADER,
    RETRY_COUNT_HEADER,
)

if TYPE_CHECKING:
    from ._recorder import Call, Recorder

__all__ = [
    "Exchange",
    "WireCapture",
    "transport_error",
]

# Statuses after which the openai SDK tries again (and so do most clients).
_RETRIED = frozenset({408, 409, 429})
_MAX_NOTE = 200
# Streams folded into a response: one cut before its end is a disconnection.
_REASSEMBLED = frozenset({"chat/completions", "completions", "responses"})


class _Events:
    """The accumulator of an event stream of an API we do not know: the events as sent."""

    __slots__ = ("chunks", "events", "ttft_ms")

    def __init__(self) -> None:
        self.chunks = 0
        self.ttft_ms: float | None = None
        self.events: list[dict[str, Any]] = []

    def add(self, chunk: dict[str, Any]) -> bool:
        self.chunks += 1
        self.events.append(chunk)
        return False

    def all_finished(self) -> bool:
        return False

    def response(self) -> Any:
        return {"events": self.events}


class WireCapture:
    """Turns HTTP exchanges into records through one `Recorder` (thread-safe as it is)."""

    __slots__ = ("_links", "recorder", "store_embeddings")

    def __init__(self, recorder: Recorder, *, store_embeddings: bool = False) -> None:
        self.recorder = recorder
        # Embedding vectors are recorded as their size and hash unless this is set.
        self.store_embeddings = store_embeddings
        self._links = RetryLinks()

    def begin(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        started: float | None = None,
    ) -> Exchange | None:
        """Start recording one request. `headers`: at least its `READ_HEADERS`, by lower-case
        name (`read_headers` picks them). None when it cannot be recorded (a failure to log,
        counted): the door then sends the request uncaptured."""
        # One frame, not two: this runs on every call.
        try:
            if started is None:
                started = time.perf_counter()
            get = headers.get
            endpoint = endpoint_of(path)
            _, key, payload, model, params, body_id = decode_body(
                endpoint, get("content-type", ""), body
            )
            notes: list[str] = []
            metadata = None
            metadata_header = get(METADATA_HEADER)
            if metadata_header is not None:
                metadata = _metadata(metadata_header, notes)
            call = self.recorder.start(
                endpoint,
                key,
                payload,
                model,
                params,
                metadata,
                client_request_id=get("x-request-id", body_id),
            )
            call.body_bytes = len(body)
            host = get(HOST_HEADER)
            if host is not None:
                problem = host_problem(host)
                if problem is None:
                    call.host = host
                else:
                    notes.append(f"{HOST_HEADER} ignored: {problem}")
            exchange = Exchange(self, call, started, endpoint, notes)
            retry = get(RETRY_COUNT_HEADER)
            idempotency = get(IDEMPOTENCY_HEADER)
            if retry is not None or idempotency is not None:
                exchange.link(method, body, retry, idempotency)
            return exchange
        except Exception as exc:
            self.recorder.logging_failed(None, exc)
            return None

    def retried(self, key: tuple[str, bytes], group: str) -> None:
        self._links.remember(key, group)

    def group_of(self, key: tuple[str, bytes]) -> str | None:
        return self._links.take(key)


def _metadata(header: str, notes: list[str]) -> dict[str, Any] | None:
    try:
        value = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        notes.append(f"{METADATA_HEADER} is not JSON ({exc}): {header[:_MAX_NOTE]!r}")
        return None
    if not isinstance(value, dict):
        notes.append(f"{METADATA_HEADER} is not a JSON object: {header[:_MAX_NOTE]!r}")
        return None
    return value


class Exchange:
    """One request's record in the making; `finish` or `fail` logs it, once."""

    __slots__ = (
        "_acc",
        "_attempt",
        "_capture",
        "_decoder",
        "_encoding",
        "_ended",
        "_extra",
        "_inflater",
        "_json",
        "_link",
        "_parts",
        "_status",
        "call",
        "endpoint",
        "started",
    )

    def __init__(
        self,
        capture: WireCapture,
        call: Call,
        started: float,
        endpoint: str,
        notes: list[str],
    ) -> None:
        self._capture = capture
        self.call = call
        self.started = started
        self.endpoint = endpoint
        self._extra: dict[str, Any] = {"capture_notes": notes} if notes else {}
        self._status: int | None = None
        self._acc: Accumulator | None = None  # set for an event stream
        self._decoder: SSEDecoder | None = None
        self._parts: list[bytes] = []
        self._json = True
        self._encoding: str | None = None
        self._inflater: Any = None
        self._ended = False
        self._link: tuple[str, bytes] | None = None  # (method, body) of calls that may be retried
        self._attempt: int | None = None  # the SDK's attempt number (0 first)

    @property
    def request_id(self) -> str:
        return self.call.request_id

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def streaming(self) -> bool:
        """Whether the response is an event stream (known once `respond` was called)."""
        return self._acc is not None

    # -- request ----------------------------------------------------------------------------
    def link(self, method: str, body: bytes, retry: str | None, idempotency: str | None) -> None:
        """Record which attempt this is, and the group shared by the attempts of one call."""
        extra = self._extra
        self._attempt = int(retry) if retry is not None and retry.isdigit() else None
        if self._attempt:  # a retry; the first attempt says so only if it fails
            extra["attempt"] = self._attempt
        if idempotency is not None:
            extra["idempotency_key"] = idempotency
            extra["retry_group"] = idempotency
            return
        # The key is built only when needed: a retry, or a failure that will be retried.
        self._link = (method, body)
        if self._attempt:
            group = self._capture.group_of(self._link_key())
            if group is not None:
                extra["retry_group"] = group

    def _link_key(self) -> tuple[str, bytes]:
        assert self._link is not None
        method, body = self._link
        return (f"{method} {self.endpoint}", body)

    def _retryable_failure(self) -> None:
        """This attempt failed in a way that is retried: let the next attempt find its group."""
        extra = self._extra
        if self._attempt is None and "idempotency_key" not in extra:
            return
        if self._attempt is not None:
            extra["attempt"] = self._attempt
        group = extra.setdefault("retry_group", self.call.request_id)
        if self._link is not None:
            self._capture.retried(self._link_key(), group)

    # -- response ---------------------------------------------------------------------------
    def respond(self, status_code: int, headers: Mapping[str, str]) -> None:
        """The status line and headers arrived: `headers` as in `begin`."""
        self._status = status_code
        content_type = headers.get("content-type", "")
        server_id = headers.get("x-request-id")
        if server_id is not None:
            self._extra["server_request_id"] = server_id
        encoding = headers.get("content-encoding")
        if encoding is not None and encoding.lower() not in ("", "identity"):
            self._encoding = encoding.lower()
        if self._encoding is not None:
            if self._encoding in ("gzip", "deflate"):
                wbits = 47 if self._encoding == "gzip" else zlib.MAX_WBITS
                self._inflater = zlib.decompressobj(wbits)
            else:
                self._note(f"response body {self._encoding}-encoded: not decoded")
        if status_code < 400 and content_type.startswith("text/event-stream"):
            self._decoder = SSEDecoder()
            self._acc = self._accumulator()
        else:
            self._json = "json" in content_type or not content_type

    def complete(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        """The whole answer at once (a body the transport had already read): `respond`,
        `feed` and `finish("done")` in one step, as the caller got it (decoded)."""
        try:
            self.respond(status_code, headers)
            if self._acc is not None or self._encoding is not None or status_code >= 400:
                if content:
                    self._take(content)
                if not self._ended:
                    self._finish("done", None)
                return
            self._ended = True
            if content:
                self._log_reply(content, status_code, self._extra or None)
            else:
                self.call.log(self.started, status_code=status_code, extra=self._extra or None)
        except Exception as exc:  # a logging failure never reaches the caller
            self._broken(exc)

    def _accumulator(self) -> Accumulator:
        endpoint = self.endpoint
        if endpoint == "chat/completions":
            choice = self.call.params.get("tool_choice")
            forced = choice == "required" or isinstance(choice, dict)
            return StreamAccumulator(True, self.started, forced)
        if endpoint == "completions":
            return StreamAccumulator(False, self.started)
        if endpoint == "responses":
            return ResponsesAccumulator(self.started)
        return _Events()

    def feed(self, data: bytes) -> None:
        """A chunk of the (raw) body, as it passes to the caller."""
        if self._ended or not data:
            return
        try:
            self._take(data)
        except Exception as exc:  # a logging failure never reaches the caller
            self._broken(exc)

    def _broken(self, exc: Exception) -> None:
        self._ended = True
        self._capture.recorder.logging_failed(self.call.request_id, exc)

    def _take(self, data: bytes) -> None:
        if self._inflater is not None:
            try:
                data = self._inflater.decompress(data)
            except zlib.error as exc:
                self._note(f"response body cannot be decompressed: {exc}")
                self._inflater = None
                self._encoding = "unreadable"
                return
        elif self._encoding is not None:
            return
        decoder = self._decoder
        if decoder is None:
            self._parts.append(data)
            return
        for event in decoder.feed(data):
            self._event(event)

    def _event(self, data: bytes) -> None:
        acc = self._acc
        if acc is None:
            return
        if data == b"[DONE]":
            self._finish_stream("completed")
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            error = APIError(f"invalid JSON in stream: {exc}", request_id=self.call.request_id)
            self._finish_stream("protocol_error", error)
            return
        if not isinstance(chunk, dict):
            error = APIError("stream event is not a JSON object", request_id=self.request_id)
            self._finish_stream("protocol_error", error)
            return
        if "error" in chunk and "choices" not in chunk:
            self._finish_stream("error_event", error_from_event(chunk, self.call.request_id))
            return
        acc.add(chunk)

    def finish(self, end: str = "done", error: APIError | None = None) -> None:
        """The body ended: "done" (read to its end), "closed" (by the caller before its end),
        "dropped" (garbage-collected unclosed), "disconnected" (the connection failed:
        `error` says how) or "cancelled". Streams record it in `stream_end` with the words
        the middleware's own streams use (`StreamEnd`)."""
        if self._ended:
            return
        try:
            self._finish(end, error)
        except Exception as exc:  # a logging failure never reaches the caller
            self._broken(exc)

    def _finish(self, end: str, error: APIError | None) -> None:
        if self._acc is not None:
            self._end_stream(end, error)
            return
        self._ended = True
        status = self._status
        extra = self._extra or None
        if error is not None:
            self.call.log(self.started, error=error, status_code=status, extra=extra)
            return
        raw = b"".join(self._parts)
        self._parts = []
        if end != "done":
            self._note(f"response body {end} before its end ({len(raw)} bytes read)")
            extra = self._extra
        if status is not None and status >= 400:
            failure = _status_error(status, raw, self.call.request_id)
            if status in _RETRIED or status >= 500:
                self._retryable_failure()
                extra = self._extra
            self.call.log(self.started, error=failure, status_code=status, extra=extra)
            return
        if not raw or end != "done" or self._encoding not in (None, "gzip", "deflate"):
            self.call.log(self.started, status_code=status, extra=extra)
            return
        self._log_reply(raw, status, extra)

    def _log_reply(self, raw: bytes, status: int | None, extra: dict[str, Any] | None) -> None:
        """A complete body of a successful answer: JSON when it parses, else its text."""
        call = self.call
        reply_bytes: int | None = len(raw)
        try:
            response: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if self._json:
                bad = APIError(f"server returned invalid JSON: {exc}", request_id=call.request_id)
                call.log(self.started, error=bad, status_code=status, extra=extra)
                return
            response = raw.decode("utf-8", "replace")
            reply_bytes = None
        if self.endpoint == "embeddings" and not self._capture.store_embeddings:
            response = summarize_embeddings(response)
            reply_bytes = None
        call.log(
            self.started,
            response=response,
            status_code=status,
            reply_bytes=reply_bytes,
            extra=extra,
        )

    def _end_stream(self, end: str, error: APIError | None) -> None:
        acc = self._acc
        assert acc is not None and self._decoder is not None
        rid = self.call.request_id
        if end == "done":
            for event in self._decoder.close():
                self._event(event)
            if self._ended:
                return
            if acc.all_finished() or self.endpoint not in _REASSEMBLED:
                self._finish_stream("completed")  # a server that does not send [DONE]
            else:
                error = APIConnectionError("stream ended before [DONE]", request_id=rid)
                self._finish_stream("disconnected", error)
        elif end in ("closed", "dropped"):
            if acc.all_finished():  # only the usage chunk and [DONE] were left
                self._finish_stream("completed")
                return
            how = "closed by the caller" if end == "closed" else "garbage-collected unclosed"
            message = f"stream {how} after {acc.chunks} chunks"
            self._finish_stream("abandoned", APIError(message, request_id=rid))
        else:
            self._finish_stream("cancelled" if end == "cancelled" else "disconnected", error)

    def _finish_stream(self, end: StreamEnd, error: APIError | None = None) -> None:
        self._ended = True
        acc = self._acc
        assert acc is not None
        extra = self._extra
        extra["chunks"] = acc.chunks
        extra["stream_end"] = end
        self.call.log(
            self.started,
            response=acc.response(),
            error=error,
            status_code=self._status,
            stream=True,
            ttft_ms=acc.ttft_ms,
            extra=extra,
        )

    def fail(self, error: APIError, *, retried: bool = True) -> None:
        """No response: the request timed out or the connection failed (which the SDK
        retries), or the caller gave up waiting (`retried=False`)."""
        if self._ended:
            return
        self._ended = True
        if retried:
            self._retryable_failure()
        self.call.log(self.started, error=error, extra=self._extra or None)

    def _note(self, text: str) -> None:
        self._extra.setdefault("capture_notes", []).append(text)


def _status_error(status: int, content: bytes, request_id: str) -> APIError:
    message, error_type, param, body = parse_error_body(status, content)
    return status_error_class(status)(
        message,
        status_code=status,
        error_type=error_type,
        param=param,
        body=body,
        request_id=request_id,
    )


def transport_error(exc: BaseException, url: str, request_id: str, *, timeout: bool) -> APIError:
    """The middleware's error for an exception of the HTTP layer (httpx or httpx2)."""
    detail = f"{url}: {str(exc) or type(exc).__name__}"
    if timeout:
        return APITimeoutError(f"request timed out: {detail}", request_id=request_id)
    return APIConnectionError(f"connection failed: {detail}", request_id=request_id)
