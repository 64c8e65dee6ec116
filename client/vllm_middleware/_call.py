"""The HTTP side of one client call: request headers and body, the exchange, and what the
reply means. The record itself is the recorder's (`_recorder.Call.log`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import orjson

from ._exceptions import APIError, InvalidRequestError
from ._http import exception_from_response, exception_from_transport, exception_from_unsendable
from ._recorder import Call
from ._streaming import StreamEnd, log_unstarted

__all__ = [
    "JSON_HEADERS",
    "SSE_HEADERS",
    "encode_body",
    "header_request_id",
    "json_reply",
    "missing_headers",
    "send_logged",
    "usage_hidden",
    "usage_options",
]

JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


def missing_headers(
    client: httpx.AsyncClient | httpx.Client, wanted: Mapping[str, str]
) -> dict[str, str] | None:
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


def header_request_id(headers: Mapping[str, str] | None) -> str | None:
    if headers:
        for name, value in headers.items():
            if name.lower() == "x-request-id":
                return value
    return None


def encode_body(call: Call, started: float, body: Any, stream: bool = False) -> bytes:
    """The JSON request body; a body that cannot be encoded is logged, then raised as
    `InvalidRequestError`."""
    try:
        content = orjson.dumps(body)
    except TypeError as exc:
        error = InvalidRequestError(f"request body is not JSON-serializable: {exc}")
        if stream:
            log_unstarted(call, started, error, "invalid_request")
        else:
            call.log(started, error=error)
        raise error from exc
    call.body_bytes = len(content)
    return content


async def send_logged(
    call: Call,
    started: float,
    url: httpx.URL | str,
    sending: Awaitable[httpx.Response],
    unstarted: Callable[[APIError | InvalidRequestError, StreamEnd], None] | None = None,
) -> httpx.Response:
    """Await the HTTP exchange; a failure before any response is logged (through `unstarted`
    for a stream, which says how it ended) and raised as the middleware's own error."""
    error: APIError | InvalidRequestError
    try:
        return await sending
    except httpx.HTTPError as exc:
        error, end = exception_from_transport(exc, call.request_id), "disconnected"
        cause: BaseException = exc
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        error, end = exception_from_unsendable(exc, url, call.request_id), "invalid_request"
        cause = exc
    except asyncio.CancelledError:
        cancelled = APIError("cancelled by the caller before the response")
        if unstarted is None:
            call.log(started, error=cancelled)
        else:
            unstarted(cancelled, "cancelled")
        raise
    if unstarted is None:
        call.log(started, error=error)
    else:
        unstarted(error, end)  # type: ignore[arg-type]
    raise error from cause


def json_reply(
    call: Call,
    started: float,
    response: httpx.Response,
    transform: Callable[[Any], Any] | None = None,
    *,
    allow_empty: bool = False,
) -> Any:
    """The server's JSON answer, logged with the call; an error status or a body that is not
    JSON is logged and raised. `transform` gives what the record keeps of the answer;
    `allow_empty`: an empty body is the answer None (endpoints that may answer nothing)."""
    status_code = response.status_code
    if status_code >= 400:
        status_error = exception_from_response(response, call.request_id)
        call.log(started, error=status_error, status_code=status_code)
        raise status_error
    raw = response.content
    try:
        result = None if allow_empty and not raw else orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        bad = APIError(f"server returned invalid JSON: {exc}", request_id=call.request_id)
        call.log(started, error=bad, status_code=status_code)
        raise bad from exc
    if transform is None:
        call.log(started, response=result, status_code=status_code, reply_bytes=len(raw))
    else:
        call.log(started, response=transform(result), status_code=status_code)
    return result
