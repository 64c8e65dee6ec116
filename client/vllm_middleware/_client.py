"""`VLLMMiddleware`: the thin client apps call instead of the server, logging every call.

The request path does the HTTP call, builds one record dict, encodes it once and hands it to a
`Shipper` (Redis stream or embedded files). Nothing on that path awaits Redis or the disk, and
nothing that goes wrong with logging reaches the caller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Literal, overload

import httpx
import orjson
import redis.asyncio as aioredis

from ._call import JSON_HEADERS, SSE_HEADERS, missing_headers, start_call, usage_hidden
from ._capture import CapturePolicy, ContentMode, Redactor, capture_policy
from ._destination import Destination, collected_unclosed, mode_of, open_destination
from ._endpoints import Endpoints
from ._exceptions import APIError, ConfigurationError
from ._http import (
    absolute_url,
    exception_from_response,
    exception_from_transport,
    exception_from_unsendable,
    new_http_client,
)
from ._keys import StreamKeys
from ._media import MediaPipeline, MediaPolicy
from ._modes import log_modes
from ._partition import LogFormat, check_host
from ._record import RecordEntry, default_host, utc_now
from ._settings import ClientSettings
from ._shipping import Shipper
from ._stats import ClientStatistics, local_statistics
from ._streaming import AsyncStream, StreamState, fail_before_stream, log_unstarted

__all__ = ["VLLMMiddleware"]

logger = logging.getLogger("vllm_middleware")

_ACCEPT_JSON = {"accept": "application/json"}
_Endpoint = Literal["chat/completions", "completions"]


class VLLMMiddleware(Endpoints):
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
        # Validated once, here; the request path reads the plain attributes set below.
        settings = ClientSettings.load(
            base_url=base_url,
            log_dir=str(log_dir),
            enable_file_logging=enable_file_logging,
            log_format=log_format,
            max_log_size_mb=max_log_size_mb,
            redis_url=redis_url,
            stream=stream,
            host=host,
            timeout=None if isinstance(timeout, httpx.Timeout) else timeout,
            max_buffer=max_buffer,
            batch_size=batch_size,
            flush_interval=flush_interval,
            fsync=fsync,
            durable=durable,
            media_policy=media_policy,
            media_dir=None if media_dir is None else str(media_dir),
            media_min_bytes=media_min_bytes,
            max_record_bytes=max_record_bytes,
            file_mode=file_mode,
            dir_mode=dir_mode,
            content=content,
            sample_rate=sample_rate,
        )
        # Records hold prompts and answers: not world-readable (0640/0750 unless configured).
        self.file_modes = log_modes(settings.file_mode, settings.dir_mode)
        # None unless an option is set: the request path then checks one attribute, no more.
        self._capture: CapturePolicy | None = capture_policy(
            redact, settings.content, settings.sample_rate
        )
        self.base_url = base_url.rstrip("/")
        # Absolute URLs, so the middleware's base_url applies whatever an injected client's
        # own base_url is (or without one); parsed once here rather than on every call.
        self._urls: dict[str, httpx.URL | str] = {
            endpoint: absolute_url(self.base_url, endpoint)
            for endpoint in ("chat/completions", "completions", "models")
        }
        self.log_dir = str(log_dir)
        self.enable_file_logging = enable_file_logging
        self.log_format = log_format
        self.max_log_size_mb = max_log_size_mb
        self.host = check_host(settings.host or default_host())
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.keys = StreamKeys(stream)
        self.redis_url = settings.redis_url

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

        self.total_requests = 0
        self.logging_errors = 0
        self.records_truncated = 0
        #: called with each record before it is encoded (`ClientMetrics.attach`); off if None
        self.record_observer: Callable[[dict[str, Any]], None] | None = None
        self.max_record_bytes = max_record_bytes
        self.media_policy: MediaPolicy = media_policy
        self._media: MediaPipeline | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._redis: aioredis.Redis | None = None
        self._sink: Shipper | None = None
        self._destination: Destination | None = None
        self._durable = False
        if enable_file_logging:
            destination = open_destination(
                log_dir=log_dir,
                redis_url=self.redis_url,
                redis_client=redis_client,
                keys=self.keys,
                shipping=settings.shipping(),
                durable=None,
                max_log_size_mb=max_log_size_mb,
                log_format=log_format,
                fsync=fsync,
                media_policy=media_policy,
                media_dir=media_dir,
                media_min_bytes=media_min_bytes,
                max_record_bytes=max_record_bytes,
                modes=self.file_modes,
            )
            self._destination = destination
            self._sink, self._media = destination.sink, destination.media
            self._redis, self._durable = destination.redis, destination.durable
            if self._media is not None:
                self.media_policy = self._media.policy
        self._stats = ClientStatistics(
            log_dir=self.log_dir,
            logging_enabled=enable_file_logging,
            keys=self.keys,
            redis_client=self._redis,
            redis_url=self.redis_url,
        )

        # Dropped without close: save what is buffered, and say so (never at exit: there the
        # shippers' own exit handler saves everything, quietly).
        self._finalizer = weakref.finalize(self, collected_unclosed, self._destination)
        self._finalizer.atexit = False

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

    @property
    def mode(self) -> str:
        return mode_of(self._sink)

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
        if not self._finalizer.detach():
            return  # closed already

        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        if self._destination is not None:
            await self._destination.aclose(timeout)
        if self._owns_http and self._loop in (None, asyncio.get_running_loop()):
            # (On another loop than the calls', its connections went with their loop.)
            await self._http.aclose()
        self._stats.close()

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
        # Plain ifs, not a **kwargs helper: this runs on every call.
        params: dict[str, Any] = {}
        if temperature is not None:
            params["temperature"] = temperature
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if tools is not None:
            params["tools"] = tools
        if tool_choice is not None:
            params["tool_choice"] = tool_choice
        if extra:
            params.update(extra)
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
        params: dict[str, Any] = {}
        if temperature is not None:
            params["temperature"] = temperature
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if extra:
            params.update(extra)
        if stream:
            params["stream"] = True
            return await self._open_stream(
                "completions", "prompt", prompt, model, params, metadata, headers
            )
        call = self._call("completions", "prompt", prompt, model, params, metadata, headers)
        if self._durable:
            return await self._wait_durable(call)
        return await call

    async def models(self) -> dict[str, Any]:
        """GET /models: the served models, as the server's JSON.

        Like `health`, a control-plane call: it is not traffic and writes no record.
        """
        if asyncio.get_running_loop() is not self._loop:
            self._enter_loop()
        url = self._urls["models"]
        try:
            response = await self._http.get(url, headers=_ACCEPT_JSON)
        except httpx.HTTPError as exc:
            raise exception_from_transport(exc, "models") from exc
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise exception_from_unsendable(exc, url, None) from exc
        if response.status_code >= 400:
            raise exception_from_response(response, "models")
        try:
            return orjson.loads(response.content)  # type: ignore[no-any-return]
        except orjson.JSONDecodeError as exc:
            raise APIError(f"server returned invalid JSON: {exc}") from exc

    async def health(self, timeout: float = 5.0) -> bool:
        """GET /health (at the server root, beside /v1): True when the server answers 200.

        Never raises for an unreachable or failing server; writes no record.
        """
        if asyncio.get_running_loop() is not self._loop:
            self._enter_loop()
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        try:
            response = await self._http.get(f"{root}/health", timeout=timeout)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError):
            return False
        return response.status_code == 200

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
        if asyncio.get_running_loop() is not self._loop:
            self._enter_loop()
        call, started, content, send_headers = start_call(
            self, endpoint, payload_key, payload, model, params, metadata, headers, utc_now()
        )
        url = self._urls[endpoint]
        try:
            response = await self._http.post(url, content=content, headers=send_headers)
        except httpx.HTTPError as exc:
            api_error = exception_from_transport(exc, call.request_id)
            call.log(started, error=api_error)
            raise api_error from exc
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            unsendable = exception_from_unsendable(exc, url, call.request_id)
            call.log(started, error=unsendable)
            raise unsendable from exc
        except asyncio.CancelledError:
            call.log(started, error=APIError("cancelled by the caller before the response"))
            raise
        status_code = response.status_code
        if status_code >= 400:
            status_error = exception_from_response(response, call.request_id)
            call.log(started, error=status_error, status_code=status_code)
            raise status_error
        raw = response.content
        try:
            result = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            bad = APIError(f"server returned invalid JSON: {exc}", request_id=call.request_id)
            call.log(started, error=bad, status_code=status_code)
            raise bad from exc
        call.log(started, response=result, status_code=status_code, reply_bytes=len(raw))
        return result  # type: ignore[no-any-return]

    async def _wait_durable(self, call: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        """`durable=True`: run `call`, then wait until its record is in Redis, the spool or the
        files (not when the caller cancelled it)."""
        try:
            return await call
        finally:
            task = asyncio.current_task()
            sink = self._sink
            if sink is not None and (task is None or not task.cancelling()):
                try:
                    if self._media is not None:
                        await self._media.drain(sink.settings.redis_timeout * 2 + 1)
                    await sink.wait_durable(sink.settings.redis_timeout * 2 + 1)
                except Exception:
                    self._logging_failed(None)

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
        if asyncio.get_running_loop() is not self._loop:
            self._enter_loop()
        call, started, content, send_headers = start_call(
            self, endpoint, payload_key, payload, model, params, metadata, headers, utc_now(), True
        )
        request_id = call.request_id
        hide_usage = usage_hidden(params.get("stream_options"))
        url = self._urls[endpoint]
        try:
            request = self._http.build_request("POST", url, content=content, headers=send_headers)
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            api_error = exception_from_transport(exc, request_id)
            log_unstarted(call, started, api_error, "disconnected")
            raise api_error from exc
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            unsendable = exception_from_unsendable(exc, url, request_id)
            log_unstarted(call, started, unsendable, "invalid_request")
            raise unsendable from exc
        except asyncio.CancelledError:
            cancelled = APIError("cancelled by the caller before the response")
            log_unstarted(call, started, cancelled, "cancelled")
            raise
        if response.status_code >= 400:
            await fail_before_stream(call, started, response)
        state = StreamState(
            call,
            started,
            response,
            chat=endpoint == "chat/completions",
            hide_usage=hide_usage,
            spawn=self._spawn,
        )
        return AsyncStream(state)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run clean-up that cannot be awaited where it starts (a finalizer); keep a reference."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- logging ----------------------------------------------------------------------------
    def _logging_failed(self, request_id: Any, exc: BaseException | None = None) -> None:
        """A record could not be logged: counted (and logged, sparingly), never raised."""
        self.logging_errors += 1
        if self.logging_errors == 1 or self.logging_errors % 1000 == 0:
            logger.error("could not log request %s", request_id, exc_info=exc or True)

    def _ship(self, date: str, is_error: bool) -> Callable[[bytes], None]:
        def ship(data: bytes) -> None:
            if self._sink is not None:
                self._sink.submit(RecordEntry(date, self.host, is_error, data))

        return ship

    # -- statistics -------------------------------------------------------------------------
    def _local_statistics(self) -> dict[str, Any]:
        stats = local_statistics(
            self.mode,
            self.total_requests,
            self._sink,
            self._media,
            logging_errors=self.logging_errors,
            truncated=self.records_truncated,
            media_policy=self.media_policy,
        )
        if self._capture is not None:
            stats.update(self._capture.statistics())
        return stats

    def get_statistics(self) -> dict[str, Any]:
        """Usage statistics; includes the original tool's keys.

        Redis mode: the workers' exact fleet-wide counters (O(1)); embedded: this client's
        request count and a scan of the file tree. `client` holds this process's counters.
        """
        return self._stats.read(self._local_statistics(), self.total_requests)

    async def aget_statistics(self) -> dict[str, Any]:
        """`get_statistics` without blocking the event loop on Redis or the file scan."""
        return await self._stats.aread(self._local_statistics(), self.total_requests)
