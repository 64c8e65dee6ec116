"""What the async and the sync client share apart from I/O: the settings, validated once; the
recorder; the original tool's attribute names; statistics; how a call's record starts and what
its request body holds."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import redis.asyncio as aioredis

from ._call import header_request_id, usage_options
from ._capture import ContentMode, Redactor
from ._http import absolute_url
from ._media import MediaPipeline, MediaPolicy
from ._partition import LogFormat
from ._recorder import Call, Recorder
from ._settings import ClientSettings
from ._sinks._shipping import Shipper

__all__ = ["ClientBase", "call_params", "request_body"]

# The endpoints whose URLs a client parses once, at construction.
_ENDPOINTS = ("chat/completions", "completions", "models")


class ClientBase:
    """The recorder and settings side of a client (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        log_dir: str | os.PathLike[str],
        enable_file_logging: bool,
        log_format: LogFormat,
        max_log_size_mb: float,
        *,
        redis_url: str | None,
        redis_client: aioredis.Redis | None,
        stream: str,
        host: str | None,
        metadata: Mapping[str, Any] | None,
        timeout: float | httpx.Timeout,
        max_buffer: int,
        batch_size: int,
        flush_interval: float,
        fsync: bool,
        durable: bool | None,
        media_policy: MediaPolicy,
        media_dir: str | os.PathLike[str] | None,
        media_min_bytes: int,
        max_record_bytes: int,
        file_mode: int | str | None,
        dir_mode: int | str | None,
        redact: Redactor | None,
        content: ContentMode,
        sample_rate: float,
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
        self._recorder = recorder = Recorder(
            settings=settings,
            metadata=metadata,
            redis_client=redis_client,
            redact=redact,
            owner=type(self).__name__,
        )
        self.base_url = base_url.rstrip("/")
        # Absolute URLs, so the middleware's base_url applies whatever an injected client's
        # own base_url is (or without one); parsed once here rather than on every call.
        self._urls: dict[str, httpx.URL | str] = {
            endpoint: absolute_url(self.base_url, endpoint) for endpoint in _ENDPOINTS
        }
        self.log_dir = str(log_dir)
        self.enable_file_logging = enable_file_logging
        self.log_format = log_format
        self.max_log_size_mb = max_log_size_mb
        self.keys = recorder.keys
        self.redis_url = recorder.redis_url
        self.file_modes = recorder.file_modes
        self.max_record_bytes = max_record_bytes
        # The recorder's sink and media store (read by `durable` waits and by tests).
        self._sink: Shipper | None = recorder.sink
        self._media: MediaPipeline | None = recorder.media
        self._durable = recorder.durable

    # The recorder's counters and settings, under the names the original tool used.
    @property
    def host(self) -> str:
        return self._recorder.host

    @property
    def metadata(self) -> dict[str, Any]:
        return self._recorder.metadata

    @property
    def media_policy(self) -> MediaPolicy:
        return self._recorder.media_policy

    @property
    def total_requests(self) -> int:
        return self._recorder.total_requests

    @property
    def logging_errors(self) -> int:
        return self._recorder.logging_errors

    @property
    def records_truncated(self) -> int:
        return self._recorder.records_truncated

    @property
    def record_observer(self) -> Callable[[dict[str, Any]], None] | None:
        """Called with each record before it is encoded (`ClientMetrics.attach`); off if None."""
        return self._recorder.record_observer

    @record_observer.setter
    def record_observer(self, observer: Callable[[dict[str, Any]], None] | None) -> None:
        self._recorder.record_observer = observer

    @property
    def recorder(self) -> Recorder:
        """Builds and ships this client's records (shared with other doors if wanted)."""
        return self._recorder

    @property
    def mode(self) -> str:
        return self._recorder.mode

    def get_statistics(self) -> dict[str, Any]:
        """Usage statistics; includes the original tool's keys.

        Redis mode: the workers' exact fleet-wide counters (O(1)); embedded: this client's
        request count and a scan of the file tree. `client` holds this process's counters.
        """
        return self._recorder.statistics()

    def _begin(
        self,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> Call:
        """A call begins: counted by the recorder, with the caller's own request id if any."""
        client_request_id = header_request_id(headers)
        if client_request_id is None and "request_id" in params:
            client_request_id = params["request_id"]
        return self._recorder.start(
            endpoint,
            payload_key,
            payload,
            model,
            params,
            metadata,
            client_request_id=client_request_id,
        )


def call_params(
    temperature: float | None,
    max_tokens: int | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The body fields of a chat or completions call besides model and payload (the record's
    `parameters`): the named arguments that were given, then the caller's extra fields."""
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
    return params


def request_body(
    params: dict[str, Any], model: str | None, payload_key: str, payload: Any, stream: bool
) -> dict[str, Any]:
    """The JSON body sent for a call with these `parameters`."""
    body = dict(params)
    if stream and (options := usage_options(params.get("stream_options"))) is not None:
        # Usage is only sent when asked for: ask for it whatever else the caller set (the
        # stream hides what the caller did not ask for). `parameters` stay the caller's own.
        body["stream_options"] = options
    if model is not None:
        body["model"] = model
    body[payload_key] = payload
    return body
