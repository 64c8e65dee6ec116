"""`SyncVLLMMiddleware`: `VLLMMiddleware` for synchronous code (Flask, Django, scripts,
notebooks), over an `httpx.Client`.

The same arguments, methods and records as the async client, without `await`. One client may
be shared by the threads of a pool: `httpx.Client` is thread-safe, and the recorder's sink
takes records from any thread and ships them from its own (Redis mode) or through the embedded
writer, so the calling thread never waits for Redis or the disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
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
from ._client_base import call_params, request_body
from ._exceptions import APIError
from ._http import new_sync_http_client
from ._media import MediaPolicy
from ._partition import LogFormat
from ._recorder import Call
from ._sync_endpoints import CANCELLED, SEND_ERRORS, SyncEndpoints, unanswered
from ._sync_streaming import Stream

__all__ = ["SyncVLLMMiddleware"]

_Endpoint = Literal["chat/completions", "completions"]


class SyncVLLMMiddleware(SyncEndpoints):
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
            return self._durably(lambda: self._exchange(call, started, endpoint, body, headers))
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
        except SEND_ERRORS as exc:
            raise unanswered(call, started, url, exc, stream=False) from exc
        except KeyboardInterrupt:
            call.log(started, error=APIError(CANCELLED))
            raise
        return json_reply(call, started, response)  # type: ignore[no-any-return]

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
        return self._send_stream(
            call,
            started,
            self._urls[endpoint],
            content,
            send_headers,
            chat=endpoint == "chat/completions",
            hide_usage=usage_hidden(params.get("stream_options")),
        )
