"""`SyncVLLMMiddleware`: `VLLMMiddleware` for synchronous code (Flask, Django, scripts,
notebooks), over an `httpx.Client`.

The same arguments, methods and records as the async client, without `await`. One client may
be shared by the threads of a pool: `httpx.Client` is thread-safe, and the recorder's sink
takes records from any thread and ships them from its own (Redis mode) or through the embedded
writer, so the calling thread never waits for Redis or the disk.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, Literal, overload

import httpx
import redis.asyncio as aioredis

from ._call import (
    JSON_HEADERS,
    SSE_HEADERS,
    encode_body,
    json_reply,
    missing_headers,
    usage_hidden,
)
from ._capture import ContentMode, Redactor
from ._client_base import ClientBase, call_params, request_body
from ._exceptions import APIError, InvalidRequestError
from ._http import (
    control_reply,
    exception_from_transport,
    exception_from_unsendable,
    new_sync_http_client,
)
from ._media import MediaPolicy
from ._partition import LogFormat
from ._recorder import Call
from ._stream_core import StreamEnd, log_unstarted
from ._sync_streaming import Stream, SyncStreamState, fail_before_sync_stream

__all__ = ["SyncVLLMMiddleware"]

_ACCEPT_JSON = {"accept": "application/json"}
_Endpoint = Literal["chat/completions", "completions"]
# What the HTTP layer raises for a request that got no response: httpx's own errors, and
# `InvalidURL` / `ValueError` / `TypeError` for a URL or header it cannot send.
_SEND_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError)
_CANCELLED = "cancelled by the caller before the response"


class SyncVLLMMiddleware(ClientBase):
    """Sync client for vLLM's OpenAI-compatible API that logs every request and response.

    Takes the arguments of `VLLMMiddleware` (an injected `http_client` is an `httpx.Client`)
    and writes the same records to the same sinks. Safe to share between threads. Close it
    (or use ``with``) to flush the records; one dropped unclosed still saves them, with a
    `ResourceWarning`.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8081/v1",
        log_dir: str | os.PathLike[str] = "./logs/vllm",
        enable_file_logging: bool = True,
        log_format: LogFormat = "jsonl",
        max_log_size_mb: float = 100,
        *,
        redis_url: str | None = None,
        redis_client: aioredis.Redis | None = None,
        stream: str = "vllm:logs",
        host: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        http_client: httpx.Client | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 600.0,
        max_buffer: int = 50_000,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        fsync: bool = True,
        durable: bool | None = None,
        media_policy: MediaPolicy = "reference",
        media_dir: str | os.PathLike[str] | None = None,
        media_min_bytes: int = 1024,
        max_record_bytes: int = 8 * 1024 * 1024,
        file_mode: int | str | None = None,
        dir_mode: int | str | None = None,
        redact: Redactor | None = None,
        content: ContentMode = "full",
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__(
            base_url,
            log_dir,
            enable_file_logging,
            log_format,
            max_log_size_mb,
            redis_url=redis_url,
            redis_client=redis_client,
            stream=stream,
            host=host,
            metadata=metadata,
            timeout=timeout,
            max_buffer=max_buffer,
            batch_size=batch_size,
            flush_interval=flush_interval,
            fsync=fsync,
            durable=durable,
            media_policy=media_policy,
            media_dir=media_dir,
            media_min_bytes=media_min_bytes,
            max_record_bytes=max_record_bytes,
            file_mode=file_mode,
            dir_mode=dir_mode,
            redact=redact,
            content=content,
            sample_rate=sample_rate,
        )
        self._owns_http = http_client is None
        if http_client is None:
            http_client = new_sync_http_client(self.base_url, api_key, timeout, JSON_HEADERS)
        self._http = http_client
        # Per-request headers cost a merge on every call: send them only when the client's
        # own defaults do not already say JSON (an injected client may not).
        self._json_headers: Mapping[str, str] | None = missing_headers(http_client, JSON_HEADERS)
        self._sse_headers: Mapping[str, str] | None = missing_headers(http_client, SSE_HEADERS)
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> SyncVLLMMiddleware:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Flush buffered records (within `timeout`) and close what this client created."""
        if self._closed:
            return
        self._closed = True
        self._recorder.close(timeout)
        if self._owns_http:
            self._http.close()

    # -- API --------------------------------------------------------------------------------
    @overload
    def chat_completion(
        self,
        messages: list[dict[str, Any]],
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        *,
        stream: Literal[False] = False,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]: ...

    @overload
    def chat_completion(
        self,
        messages: list[dict[str, Any]],
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        *,
        stream: Literal[True],
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> Stream: ...

    def chat_completion(
        self,
        messages: list[dict[str, Any]],
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        *,
        stream: bool = False,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any] | Stream:
        """POST /chat/completions. Extra vLLM fields (top_k, structured_outputs...) pass through.

        Returns the server's JSON, or with `stream=True` a `Stream` of chunk dicts.
        `headers` are sent with this call only; an `X-Request-Id` among them (or a body
        `request_id`) is kept in the record as `client_request_id`.
        """
        params = call_params(temperature, max_tokens, tools, tool_choice, extra)
        if stream:
            params["stream"] = True
            return self._open_stream(
                "chat/completions", "messages", messages, model, params, metadata, headers
            )
        return self._call(
            "chat/completions", "messages", messages, model, params, metadata, headers
        )

    @overload
    def completions(
        self,
        prompt: str | list[Any],
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        *,
        stream: Literal[False] = False,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]: ...

    @overload
    def completions(
        self,
        prompt: str | list[Any],
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        *,
        stream: Literal[True],
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> Stream: ...

    def completions(
        self,
        prompt: str | list[Any],
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        *,
        stream: bool = False,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any] | Stream:
        """POST /completions; like `chat_completion` (JSON, or a `Stream` when streaming)."""
        params = call_params(temperature, max_tokens, None, None, extra)
        if stream:
            params["stream"] = True
            return self._open_stream(
                "completions", "prompt", prompt, model, params, metadata, headers
            )
        return self._call("completions", "prompt", prompt, model, params, metadata, headers)

    def models(self) -> dict[str, Any]:
        """GET /models: the served models, as the server's JSON.

        Like `health`, a control-plane call: it is not traffic and writes no record.
        """
        url = self._urls["models"]
        try:
            response = self._http.get(url, headers=_ACCEPT_JSON)
        except httpx.HTTPError as exc:
            raise exception_from_transport(exc, "models") from exc
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise exception_from_unsendable(exc, url, None) from exc
        return control_reply(response, "models")  # type: ignore[no-any-return]

    def health(self, timeout: float = 5.0) -> bool:
        """GET /health (at the server root, beside /v1): True when the server answers 200.

        Never raises for an unreachable or failing server; writes no record.
        """
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        try:
            response = self._http.get(f"{root}/health", timeout=timeout)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError):
            return False
        return response.status_code == 200

    # -- the request path -------------------------------------------------------------------
    def _call(
        self,
        endpoint: _Endpoint,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        """A non-streaming call: the HTTP exchange, its record logged whatever happens."""
        started = time.perf_counter()
        call = self._begin(endpoint, payload_key, payload, model, params, metadata, headers)
        body = request_body(params, model, payload_key, payload, False)
        if self._durable:
            return self._durably(call, started, endpoint, body, headers)
        return self._exchange(call, started, endpoint, body, headers)

    def _exchange(
        self,
        call: Call,
        started: float,
        endpoint: _Endpoint,
        body: dict[str, Any],
        headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        content = encode_body(call, started, body)
        send_headers = self._json_headers
        if headers:
            send_headers = {**(send_headers or {}), **headers}
        url = self._urls[endpoint]
        try:
            response = self._http.post(url, content=content, headers=send_headers)
        except _SEND_ERRORS as exc:
            raise _unanswered(call, started, url, exc, stream=False) from exc
        except KeyboardInterrupt:
            call.log(started, error=APIError(_CANCELLED))
            raise
        return json_reply(call, started, response)  # type: ignore[no-any-return]

    def _durably(
        self,
        call: Call,
        started: float,
        endpoint: _Endpoint,
        body: dict[str, Any],
        headers: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        """`durable=True`: the call returns (or raises) once its record is in Redis, the spool
        or the files (not when the caller interrupted it)."""
        try:
            result = self._exchange(call, started, endpoint, body, headers)
        except KeyboardInterrupt:
            raise
        except BaseException:
            _run_blocking(self._recorder.wait_durable())
            raise
        _run_blocking(self._recorder.wait_durable())
        return result

    def _open_stream(
        self,
        endpoint: _Endpoint,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> Stream:
        """Send a streaming request; its record is logged however the stream ends."""
        started = time.perf_counter()
        call = self._begin(endpoint, payload_key, payload, model, params, metadata, headers)
        body = request_body(params, model, payload_key, payload, True)
        content = encode_body(call, started, body, stream=True)
        send_headers = self._sse_headers
        if headers:
            send_headers = {**(send_headers or {}), **headers}
        url = self._urls[endpoint]
        http = self._http
        try:
            request = http.build_request("POST", url, content=content, headers=send_headers)
            response = http.send(request, stream=True)
        except _SEND_ERRORS as exc:
            raise _unanswered(call, started, url, exc, stream=True) from exc
        except KeyboardInterrupt:
            log_unstarted(call, started, APIError(_CANCELLED), "cancelled")
            raise
        if response.status_code >= 400:
            fail_before_sync_stream(call, started, response)
        state = SyncStreamState(
            call,
            started,
            response,
            chat=endpoint == "chat/completions",
            hide_usage=usage_hidden(params.get("stream_options")),
        )
        return Stream(state)


def _unanswered(
    call: Call, started: float, url: httpx.URL | str, exc: Exception, *, stream: bool
) -> APIError | InvalidRequestError:
    """The error for a request that got no response, recorded (a stream's record also says
    how it ended)."""
    error: APIError | InvalidRequestError
    end: StreamEnd
    if isinstance(exc, httpx.HTTPError):
        error, end = exception_from_transport(exc, call.request_id), "disconnected"
    else:
        error, end = exception_from_unsendable(exc, url, call.request_id), "invalid_request"
    if stream:
        log_unstarted(call, started, error, end)
    else:
        call.log(started, error=error)
    return error


def _run_blocking(wait: Coroutine[Any, Any, None]) -> None:
    """Run a recorder wait to its end from sync code, on a loop of its own (in a thread of
    its own if this thread already runs one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(wait)
        return
    worker = threading.Thread(target=asyncio.run, args=(wait,))
    worker.start()
    worker.join()
