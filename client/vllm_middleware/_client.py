"""`VLLMMiddleware`: the thin client apps call instead of the server, logging every call.

The request path does the HTTP call, builds one record dict, encodes it once and hands it to a
`Shipper` (Redis stream or embedded files). Nothing on that path awaits Redis or the disk, and
nothing that goes wrong with logging reaches the caller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx
import redis.asyncio as aioredis

from ._call import (
    JSON_HEADERS,
    SSE_HEADERS,
    encode_body,
    json_reply,
    missing_headers,
    send_logged,
    usage_hidden,
)
from ._capture import ContentMode, Redactor
from ._client_base import ClientBase, call_params, request_body
from ._endpoints import Endpoints
from ._exceptions import APIError, ConfigurationError, InvalidRequestError
from ._http import (
    exception_from_unsendable,
    new_http_client,
)
from ._media import MediaPolicy
from ._partition import LogFormat
from ._recorder import Call
from ._streaming import (
    Accumulator,
    AsyncStream,
    StreamEnd,
    StreamState,
    fail_before_stream,
    log_unstarted,
)

__all__ = ["VLLMMiddleware"]

logger = logging.getLogger("vllm_middleware")

_Endpoint = Literal["chat/completions", "completions"]
T = TypeVar("T")


class VLLMMiddleware(ClientBase, Endpoints):
    """Async client for vLLM's OpenAI-compatible API that logs every request and response.

    Without a Redis URL (argument or `VLLM_MW_REDIS_URL`) records are written in-process to
    `log_dir/date=YYYY-MM-DD/host=NAME/` (embedded mode). With one, they go to a Redis stream
    that `vllm-mw worker` processes write to the same layout. Pass `redis_url=""` to force the
    embedded mode even when the environment names a Redis.

    Base64 media in messages and replies follow `media_policy`: "reference" (default) moves
    each blob of at least `media_min_bytes` to `media_dir/<sha256[:2]>/<sha256>.<ext>` (default
    `log_dir/media`) and keeps a `media_ref` in the record; "drop" keeps the reference only;
    "inline" keeps the data. In Redis mode the files are written by this process, so
    `media_dir` must be on a filesystem the readers share; without one, "reference" falls back
    to "drop". Encoded records over `max_record_bytes` are replaced by their metadata and a
    `truncated` note (counted in `get_statistics()["client"]["truncated"]`).
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
        http_client: httpx.AsyncClient | None = None,
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
        self._http_settings = (api_key, timeout)
        if http_client is None:
            http_client = self._new_http_client()
        self._http = http_client
        # The event loop of the calls so far: an HTTP client's connections belong to one.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Per-request headers cost a merge on every call: send them only when the client's
        # own defaults do not already say JSON (an injected client may not).
        self._json_headers: Mapping[str, str] | None = missing_headers(http_client, JSON_HEADERS)
        self._sse_headers: Mapping[str, str] | None = missing_headers(http_client, SSE_HEADERS)
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def _new_http_client(self) -> httpx.AsyncClient:
        api_key, timeout = self._http_settings
        return new_http_client(self.base_url, api_key, timeout, JSON_HEADERS)

    def _enter_loop(self) -> None:
        """The first call on an event loop other than the previous calls' one (a second
        `asyncio.run`). Records never depend on the loop (they ship from their own thread);
        the HTTP connections do: an owned client is replaced, an injected one refused."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            if not self._owns_http:
                raise ConfigurationError(
                    "this VLLMMiddleware was used on another event loop, and its injected "
                    "http_client belongs to that loop: create the middleware (and its "
                    "http_client) inside the loop that uses it, or let it make its own client"
                )
            # The old client's connections belong to the previous loop, which may be closed
            # (then it cannot be closed either): left to the garbage collector.
            self._http = self._new_http_client()
            self._background.clear()
        self._loop = loop

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> VLLMMiddleware:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, timeout: float = 10.0) -> None:
        """Flush buffered records (within `timeout`) and close what this client created."""
        if self._closed:
            return
        self._closed = True
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        await self._recorder.aclose(timeout)
        if self._owns_http and self._loop in (None, asyncio.get_running_loop()):
            # (On another loop than the calls', its connections went with their loop.)
            await self._http.aclose()

    aclose = close

    # -- API --------------------------------------------------------------------------------
    @overload
    async def chat_completion(
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
    async def chat_completion(
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
    ) -> AsyncStream: ...

    async def chat_completion(
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
    ) -> dict[str, Any] | AsyncStream:
        """POST /chat/completions. Extra vLLM fields (top_k, structured_outputs...) pass through.

        Returns the server's JSON, or with `stream=True` an `AsyncStream` of chunk dicts.
        `headers` are sent with this call only; an `X-Request-Id` among them (or a body
        `request_id`) is kept in the record as `client_request_id`.
        """
        params = call_params(temperature, max_tokens, tools, tool_choice, extra)
        if stream:
            params["stream"] = True
            return await self._open_stream(
                "chat/completions", "messages", messages, model, params, metadata, headers
            )
        call = self._call(
            "chat/completions", "messages", messages, model, params, metadata, headers
        )
        if self._durable:
            return await self._wait_durable(call)
        return await call

    @overload
    async def completions(
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
    async def completions(
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
    ) -> AsyncStream: ...

    async def completions(
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
    ) -> dict[str, Any] | AsyncStream:
        """POST /completions; like `chat_completion` (JSON, or an `AsyncStream` when streaming)."""
        params = call_params(temperature, max_tokens, None, None, extra)
        if stream:
            params["stream"] = True
            return await self._open_stream(
                "completions", "prompt", prompt, model, params, metadata, headers
            )
        call = self._call("completions", "prompt", prompt, model, params, metadata, headers)
        if self._durable:
            return await self._wait_durable(call)
        return await call

    def _start(
        self,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> Call:
        """A call begins: on this loop's HTTP client, counted by the recorder."""
        if asyncio.get_running_loop() is not self._loop:
            self._enter_loop()
        return self._begin(endpoint, payload_key, payload, model, params, metadata, headers)

    async def _call(
        self,
        endpoint: _Endpoint,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """A non-streaming call: the HTTP exchange, its record logged whatever happens."""
        started = time.perf_counter()
        call = self._start(endpoint, payload_key, payload, model, params, metadata, headers)
        content = encode_body(
            call, started, request_body(params, model, payload_key, payload, False)
        )
        send_headers = self._json_headers
        if headers:
            send_headers = {**(send_headers or {}), **headers}
        url = self._urls[endpoint]
        sending = self._http.post(url, content=content, headers=send_headers)
        response = await send_logged(call, started, url, sending)
        return json_reply(call, started, response)  # type: ignore[no-any-return]

    async def _wait_durable(self, call: Coroutine[Any, Any, T]) -> T:
        """`durable=True`: run `call`, then wait until its record is in Redis, the spool or the
        files (not when the caller cancelled it)."""
        try:
            return await call
        finally:
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                await self._recorder.wait_durable()

    async def _open_stream(
        self,
        endpoint: _Endpoint,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> AsyncStream:
        started = time.perf_counter()
        call = self._start(endpoint, payload_key, payload, model, params, metadata, headers)
        body = request_body(params, model, payload_key, payload, True)
        content = encode_body(call, started, body, stream=True)
        send_headers = self._sse_headers
        if headers:
            send_headers = {**(send_headers or {}), **headers}
        return await self._send_stream(
            call,
            started,
            self._urls[endpoint],
            content,
            send_headers,
            chat=endpoint == "chat/completions",
            hide_usage=usage_hidden(params.get("stream_options")),
        )

    async def _send_stream(
        self,
        call: Call,
        started: float,
        url: httpx.URL | str,
        content: bytes,
        headers: Mapping[str, str] | None,
        *,
        chat: bool = False,
        hide_usage: bool = False,
        acc: Accumulator | None = None,
    ) -> AsyncStream:
        """Send a streaming request; its record is logged however the stream ends."""

        def unstarted(error: APIError | InvalidRequestError, end: StreamEnd) -> None:
            log_unstarted(call, started, error, end)

        http = self._http
        try:
            request = http.build_request("POST", url, content=content, headers=headers)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            unsendable = exception_from_unsendable(exc, url, call.request_id)
            unstarted(unsendable, "invalid_request")
            raise unsendable from exc
        sending = http.send(request, stream=True)
        response = await send_logged(call, started, url, sending, unstarted)
        if response.status_code >= 400:
            await fail_before_stream(call, started, response)
        state = StreamState(
            call,
            started,
            response,
            chat=chat,
            hide_usage=hide_usage,
            spawn=self._spawn,
            acc=acc,
        )
        return AsyncStream(state)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run clean-up that cannot be awaited where it starts (a finalizer); keep a reference."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- statistics -------------------------------------------------------------------------
    async def aget_statistics(self) -> dict[str, Any]:
        """`get_statistics` without blocking the event loop on Redis or the file scan."""
        return await self._recorder.astatistics()
