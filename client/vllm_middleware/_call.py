"""One call: its request body and headers, and its record, built and submitted exactly once."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from ._exceptions import APIError, InvalidRequestError
from ._http import error_details
from ._record import SCHEMA_VERSION, RecordEntry, encode_record, record_identity

if TYPE_CHECKING:
    from ._client import VLLMMiddleware

__all__ = [
    "JSON_HEADERS",
    "SSE_HEADERS",
    "Call",
    "collect",
    "header_request_id",
    "missing_headers",
    "shrink_record",
    "start_call",
    "usage_hidden",
    "usage_options",
]

JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}

_SMALL_FIELDS = ("parameters", "metadata", "error_detail")  # kept only when small
_SMALL_BYTES = 16 * 1024
_new_entry = tuple.__new__
_UNKNOWN_SIZE = sys.maxsize  # an encoded size not known: assume it could hold media


# A record's fields in order; the payload ("messages" or "prompt") goes between the two.
_HEAD_FIELDS = ("timestamp", "request_id", "model")
_TAIL_FIELDS = (
    "response",
    "parameters",
    "latency_ms",
    "error",
    "metadata",
    "schema_version",
    "host",
    "endpoint",
    "status_code",
    "usage",
    "stream",
    "ttft_ms",
)


# What a truncated record keeps: enough to count, attribute and debug the call.
_KEPT_FIELDS = (
    *_HEAD_FIELDS,
    *(field for field in _TAIL_FIELDS if field != "response"),
    "error_detail",
    "client_request_id",
    "chunks",
    "stream_end",
)


def _template(payload_key: str) -> dict[str, Any]:
    """A record's fields in their order, with the values no call changes filled in."""
    template: dict[str, Any] = dict.fromkeys((*_HEAD_FIELDS, payload_key, *_TAIL_FIELDS))
    template["schema_version"] = SCHEMA_VERSION
    return template


# Copying a sized dict and storing into it is cheaper than a 16-key literal, which CPython
# grows key by key (two resizes).
_TEMPLATES = {key: _template(key) for key in ("messages", "prompt", "input")}


def collect(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def missing_headers(client: httpx.AsyncClient, wanted: Mapping[str, str]) -> dict[str, str] | None:
    """What `wanted` adds to the client's own default headers (None: nothing)."""
    missing = {k: v for k, v in wanted.items() if client.headers.get(k) != v}
    return missing or None


_ASK_USAGE = {"include_usage": True}


def usage_hidden(options: Any) -> bool:
    """Whether a stream with the caller's `stream_options` would carry no usage (vLLM 0.33 and
    the OpenAI API: `include_usage` defaults to false, continuous stats need it too)."""
    return not (isinstance(options, Mapping) and options.get("include_usage"))


def usage_options(options: Any) -> dict[str, Any] | None:
    """The `stream_options` to send so the stream reports usage (None: send the caller's)."""
    if options is None:
        return _ASK_USAGE.copy()
    if isinstance(options, Mapping) and not options.get("include_usage"):
        return {**options, "include_usage": True}
    return None  # already asked for, or not an object (the server says what is wrong)


def header_request_id(headers: Mapping[str, str]) -> str | None:
    for name, value in headers.items():
        if name.lower() == "x-request-id":
            return value
    return None


class Call:
    """What one call knows for its record; `log` builds and submits it exactly once."""

    __slots__ = (
        "body_bytes",
        "client",
        "client_request_id",
        "date",
        "endpoint",
        "metadata",
        "model",
        "params",
        "payload",
        "payload_key",
        "request_id",
        "timestamp",
    )

    def __init__(
        self,
        client: VLLMMiddleware,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        now: datetime,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.payload_key = payload_key
        self.payload = payload
        self.model = model
        self.params = params
        self.metadata = metadata
        self.request_id, self.date, self.timestamp = record_identity(now)
        self.client_request_id: Any = None
        # Length of the encoded request body, once it is encoded (`start_call`).
        self.body_bytes = _UNKNOWN_SIZE

    def log(
        self,
        started: float,
        *,
        response: Any = None,
        error: APIError | InvalidRequestError | None = None,
        status_code: int | None = None,
        stream: bool = False,
        ttft_ms: float | None = None,
        extra: Mapping[str, Any] | None = None,
        reply_bytes: int | None = None,
    ) -> None:
        """Build this call's record and hand it to the sink; never raises (a failure to log
        is counted instead). A record with media is finished off the loop and shipped from
        there (`MediaPipeline.defer`).

        `reply_bytes`: the length of the JSON `response` was parsed from, when there is one.
        """
        client = self.client
        sink = client._sink
        if sink is None:  # logging off: no record to build
            return
        capture = client._capture
        if (
            capture is not None
            and capture.rate < 1.0
            and error is None
            and not capture.sampled(self.request_id, self.client_request_id)
        ):
            return
        # Microseconds, as milliseconds with 3 decimals (round(x, 3) costs ~0.5 µs more).
        latency_ms = int((time.perf_counter() - started) * 1_000_000 + 0.5) / 1000
        try:
            model = self.model
            usage = None
            if isinstance(response, dict):
                usage = response.get("usage")
                if model is None:
                    model = response.get("model")
            metadata = client.metadata
            if self.metadata:
                metadata = {**metadata, **self.metadata}
            is_error = error is not None
            payload_key = self.payload_key
            record = _TEMPLATES[payload_key].copy()
            record["timestamp"] = self.timestamp
            record["request_id"] = self.request_id
            record["model"] = model
            record[payload_key] = self.payload
            record["response"] = response
            record["parameters"] = self.params
            record["latency_ms"] = latency_ms
            if is_error:
                record["error"] = str(error)
            record["metadata"] = metadata
            record["host"] = client.host
            record["endpoint"] = self.endpoint
            record["status_code"] = status_code
            record["usage"] = usage
            record["stream"] = stream
            record["ttft_ms"] = ttft_ms
            if self.client_request_id is not None:
                record["client_request_id"] = self.client_request_id
            if error is not None:
                record["error_detail"] = error_details(error)
            if extra:
                record.update(extra)
            if client.record_observer is not None:
                client.record_observer(record)
            if capture is not None:
                kept = capture.apply(record)
                if kept is None:
                    return
                record = kept
            media = client._media
            if media is not None:
                # A blob is at least `min_chars` characters of one JSON string, so JSON shorter
                # than that holds none: most chats skip the walk on two integer comparisons.
                min_chars = media.min_chars
                in_request = self.body_bytes >= min_chars
                in_reply = reply_bytes is None or reply_bytes >= min_chars
                if (in_request or in_reply) and (
                    job := media.prepare(record, messages=in_request, response=in_reply)
                ) is not None:
                    ship = client._ship(self.date, is_error)
                    media.defer(job, record, ship, client._logging_failed)
                    return
            data = encode_record(record)
            if len(data) > client.max_record_bytes:
                data = shrink_record(record, len(data), client.max_record_bytes)
                client.records_truncated += 1
            # tuple.__new__ directly: the NamedTuple's own __new__ is a Python-level frame.
            sink.submit(_new_entry(RecordEntry, (self.date, client.host, is_error, data)))
        except Exception:
            client._logging_failed(self.request_id)


def start_call(
    client: VLLMMiddleware,
    endpoint: str,
    payload_key: str,
    payload: Any,
    model: str | None,
    params: dict[str, Any],
    metadata: Mapping[str, Any] | None,
    headers: Mapping[str, str] | None,
    now: datetime,
    stream: bool = False,
) -> tuple[Call, float, bytes, Mapping[str, str] | None]:
    """Start a call made at `now`: (its `Call`, its perf_counter start, the encoded body, the
    headers to send).

    Raises `InvalidRequestError` (after logging it) when the body cannot be encoded.
    """
    started = time.perf_counter()
    client.total_requests += 1
    call = Call(client, endpoint, payload_key, payload, model, params, metadata, now)
    body = dict(params)
    if stream and (options := usage_options(params.get("stream_options"))) is not None:
        # Usage is only sent when asked for: ask for it whatever else the caller set (the
        # stream hides what the caller did not ask for). `parameters` stay the caller's own.
        body["stream_options"] = options
    if model is not None:
        body["model"] = model
    body[payload_key] = payload
    send_headers = client._sse_headers if stream else client._json_headers
    if headers:
        send_headers = {**(send_headers or {}), **headers}
        call.client_request_id = header_request_id(headers)
    if "request_id" in params and call.client_request_id is None:
        call.client_request_id = params["request_id"]
    try:
        content = orjson.dumps(body)
    except TypeError as exc:
        error = InvalidRequestError(f"request body is not JSON-serializable: {exc}")
        end = {"chunks": 0, "stream_end": "invalid_request"} if stream else None
        call.log(started, error=error, stream=stream, extra=end)
        raise error from exc
    call.body_bytes = len(content)
    return call, started, content, send_headers


def shrink_record(record: Mapping[str, Any], original_bytes: int, max_bytes: int) -> bytes:
    """The encoded stand-in for a record of `original_bytes` over the `max_bytes` cap.

    Keeps the metadata (`parameters`, `metadata` and `error_detail` only when small) and says
    why in `truncated`, so the call is still counted and attributable.
    """
    small: dict[str, Any] = {key: record[key] for key in _KEPT_FIELDS if key in record}
    for key in _SMALL_FIELDS:
        if key in small and len(encode_record(small[key])) > _SMALL_BYTES:
            small[key] = {"truncated": True}
    if isinstance(small.get("error"), str) and len(small["error"]) > _SMALL_BYTES:
        small["error"] = small["error"][:_SMALL_BYTES]
    small["truncated"] = {
        "original_bytes": original_bytes,
        "reason": f"record exceeds max_record_bytes ({original_bytes} > {max_bytes})",
    }
    return encode_record(small)
