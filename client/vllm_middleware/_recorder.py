"""The recorder: from "a call went out and came back" to "its encoded record is in the shipper".

Every front door (the async client, its other endpoints, and doors that only see HTTP bytes)
hands the recorder plain facts: the endpoint, the request's payload and parameters, the status,
the parsed reply or a stream's reassembled one, timings. The recorder alone builds the record
(one dict, in the contract's field order), applies the capture policy (sampling, redaction,
metadata-only), moves media out, caps the size, encodes once and submits it to the sink. Doors
never touch its internals, so every door writes the same record for the same traffic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import redis.asyncio as aioredis

from ._capture import CapturePolicy, Redactor, capture_policy
from ._exceptions import APIError, InvalidRequestError
from ._http import error_details
from ._keys import StreamKeys
from ._media import MediaPipeline, MediaPolicy
from ._modes import FileModes, log_modes
from ._partition import check_host
from ._record import (
    HEAD_FIELDS,
    SCHEMA_VERSION,
    TAIL_FIELDS,
    RecordEntry,
    default_host,
    encode_record,
    record_identity,
    shrink_record,
)
from ._settings import ClientSettings
from ._sinks._destination import Destination, collected_unclosed, mode_of, open_destination
from ._sinks._shipping import Shipper
from ._stats import ClientStatistics, local_statistics

__all__ = ["Call", "Recorder"]

logger = logging.getLogger("vllm_middleware")

_new_entry = tuple.__new__
# The recorder's clock: `_record.utc_now` without its Python frame (tests replace it).
utc_now = partial(datetime.now, UTC)
_dumps = orjson.dumps
_perf_counter = time.perf_counter
_UNKNOWN_SIZE = sys.maxsize  # an encoded size not known: assume it could hold media


def _template(payload_key: str) -> dict[str, Any]:
    """A record's fields in their order, with the values no call changes filled in."""
    template: dict[str, Any] = dict.fromkeys((*HEAD_FIELDS, payload_key, *TAIL_FIELDS))
    template["schema_version"] = SCHEMA_VERSION
    return template


# Copying a sized dict and storing into it is cheaper than a 16-key literal, which CPython
# grows key by key (two resizes).
_TEMPLATES = {key: _template(key) for key in ("messages", "prompt", "input")}


class Recorder:
    """Builds, encodes and ships the records of one front door (see the module docstring).

    Made with `Recorder.open(**options)` (the logging keywords of `VLLMMiddleware`) or from
    validated `ClientSettings`; `owner` names the door in the warning of a recorder dropped
    without close. The counters are this process's, for `statistics()["client"]`.
    """

    def __init__(
        self,
        *,
        settings: ClientSettings,
        metadata: Mapping[str, Any] | None = None,
        redis_client: aioredis.Redis | None = None,
        redact: Redactor | None = None,
        owner: str = "VLLMMiddleware",
    ) -> None:
        # Records hold prompts and answers: not world-readable (0640/0750 unless configured).
        self.file_modes: FileModes = log_modes(settings.file_mode, settings.dir_mode)
        # None unless an option is set: the request path then checks one attribute, no more.
        self.capture: CapturePolicy | None = capture_policy(
            redact, settings.content, settings.sample_rate
        )
        self.host = check_host(settings.host or default_host())
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.keys = StreamKeys(settings.stream)
        self.redis_url = settings.redis_url
        self.log_dir = settings.log_dir
        self.max_record_bytes = settings.max_record_bytes
        self.media_policy: MediaPolicy = settings.media_policy
        #: called with each record before it is encoded (`ClientMetrics.attach`); off if None
        self.record_observer: Callable[[dict[str, Any]], None] | None = None
        self.total_requests = 0
        self.logging_errors = 0
        self.records_truncated = 0
        self.sink: Shipper | None = None
        self.media: MediaPipeline | None = None
        self.durable = False
        self._redis: aioredis.Redis | None = None
        self._destination: Destination | None = None
        if settings.enable_file_logging:
            destination = open_destination(
                log_dir=settings.log_dir,
                redis_url=self.redis_url,
                redis_client=redis_client,
                keys=self.keys,
                shipping=settings.shipping(),
                durable=None,
                max_log_size_mb=settings.max_log_size_mb,
                log_format=settings.log_format,
                fsync=settings.fsync,
                media_policy=settings.media_policy,
                media_dir=settings.media_dir,
                media_min_bytes=settings.media_min_bytes,
                max_record_bytes=settings.max_record_bytes,
                modes=self.file_modes,
            )
            self._destination = destination
            self.sink, self.media = destination.sink, destination.media
            self._redis, self.durable = destination.redis, destination.durable
            if self.media is not None:
                self.media_policy = self.media.policy
        self._stats = ClientStatistics(
            log_dir=settings.log_dir,
            logging_enabled=settings.enable_file_logging,
            keys=self.keys,
            redis_client=self._redis,
            redis_url=self.redis_url,
        )
        # Dropped without close: save what is buffered, and say so (never at exit: there the
        # shippers' own exit handler saves everything, quietly).
        self._finalizer = weakref.finalize(self, collected_unclosed, self._destination, owner)
        self._finalizer.atexit = False

    @classmethod
    def open(
        cls,
        *,
        metadata: Mapping[str, Any] | None = None,
        redis_client: aioredis.Redis | None = None,
        redact: Redactor | None = None,
        owner: str = "Recorder",
        **options: Any,
    ) -> Recorder:
        """A recorder for the logging keywords of `VLLMMiddleware` (validated the same way,
        environment variables included)."""
        for key in ("log_dir", "media_dir"):
            if isinstance(options.get(key), os.PathLike):
                options[key] = os.fspath(options[key])
        settings = ClientSettings.load(**options)
        return cls(
            settings=settings,
            metadata=metadata,
            redis_client=redis_client,
            redact=redact,
            owner=owner,
        )

    @property
    def mode(self) -> str:
        return mode_of(self.sink)

    # -- the request path -------------------------------------------------------------------
    def start(
        self,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None = None,
        *,
        client_request_id: Any = None,
        now: datetime | None = None,
    ) -> Call:
        """One call begins (it is counted): its `Call` logs the record once it ends."""
        self.total_requests += 1
        return Call(
            self,
            endpoint,
            payload_key,
            payload,
            model,
            params,
            metadata,
            now or utc_now(),
            client_request_id,
        )

    def logging_failed(self, request_id: Any, exc: BaseException | None = None) -> None:
        """A record could not be logged: counted (and logged, sparingly), never raised."""
        self.logging_errors += 1
        if self.logging_errors == 1 or self.logging_errors % 1000 == 0:
            logger.error("could not log request %s", request_id, exc_info=exc or True)

    def shipper_for(
        self, date: str, is_error: bool, host: str | None = None
    ) -> Callable[[bytes], None]:
        """Submits one encoded record of that partition (used once media work is done)."""
        host = host or self.host

        def ship(data: bytes) -> None:
            if self.sink is not None:
                self.sink.submit(RecordEntry(date, host, is_error, data))

        return ship

    async def wait_durable(self, timeout: float | None = None) -> None:
        """Wait until every record so far left memory (into Redis, the spool or the files)."""
        sink = self.sink
        if sink is None:
            return
        if timeout is None:
            timeout = sink.settings.redis_timeout * 2 + 1
        try:
            if self.media is not None:
                await self.media.drain(timeout)
            await sink.wait_durable(timeout)
        except Exception:
            self.logging_failed(None)

    # -- statistics -------------------------------------------------------------------------
    def local_statistics(self) -> dict[str, Any]:
        """This process's counters: `statistics()["client"]`."""
        stats = local_statistics(
            self.mode,
            self.total_requests,
            self.sink,
            self.media,
            logging_errors=self.logging_errors,
            truncated=self.records_truncated,
            media_policy=self.media_policy,
        )
        if self.capture is not None:
            stats.update(self.capture.statistics())
        return stats

    def statistics(self) -> dict[str, Any]:
        """Redis mode: the workers' fleet-wide counters; embedded: a scan of the tree."""
        return self._stats.read(self.local_statistics(), self.total_requests)

    async def astatistics(self) -> dict[str, Any]:
        """`statistics` without blocking the event loop on Redis or the file scan."""
        return await self._stats.aread(self.local_statistics(), self.total_requests)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    async def aclose(self, timeout: float = 10.0) -> None:
        """Flush buffered records (within `timeout`) and give the sink back (idempotent)."""
        if not self._finalizer.detach():
            return
        if self._destination is not None:
            await self._destination.aclose(timeout)
        self._stats.close()

    def close(self, timeout: float = 10.0) -> None:
        """`aclose` for synchronous code: blocks the calling thread, never an event loop's."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.aclose(timeout))
            return
        # Called on a running loop: do the blocking part in a thread of its own.
        worker = threading.Thread(target=asyncio.run, args=(self.aclose(timeout),))
        worker.start()
        worker.join()


class Call:
    """What one call knows for its record; `log` builds and submits it exactly once."""

    __slots__ = (
        "body_bytes",
        "client_request_id",
        "date",
        "endpoint",
        "host",
        "metadata",
        "model",
        "params",
        "payload",
        "payload_key",
        "recorder",
        "request_id",
        "timestamp",
    )

    def __init__(
        self,
        recorder: Recorder,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        now: datetime,
        client_request_id: Any = None,
    ) -> None:
        self.recorder = recorder
        self.endpoint = endpoint
        self.payload_key = payload_key
        self.payload = payload
        self.model = model
        self.params = params
        self.metadata = metadata
        self.request_id, self.date, self.timestamp = record_identity(now)
        self.client_request_id = client_request_id
        # The record's host (partition): the recorder's, unless a door sets one for this call.
        self.host = recorder.host
        # Length of the encoded request body, once known: small bodies skip the media walk.
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
        chunks: int | None = None,
        stream_end: str | None = None,
    ) -> None:
        """Build this call's record and hand it to the sink; never raises (a failure to log
        is counted instead). A record with media is finished off the loop and shipped from
        there (`MediaPipeline.defer`).

        `reply_bytes`: the length of the JSON `response` was parsed from, when there is one, or
        0 when the door knows `response` can hold no media (a stream whose chunks carried no
        audio): either way, below the media threshold the reply is not walked.
        `chunks` and `stream_end`: a stream's fields (`extra` would cost a dict per stream).
        """
        recorder = self.recorder
        sink = recorder.sink
        if sink is None:  # logging off: no record to build
            return
        capture = recorder.capture
        if (
            capture is not None
            and capture.rate < 1.0
            and error is None
            and not capture.sampled(self.request_id, self.client_request_id)
        ):
            sink.count_sampled_out()  # the fleet's statistics count what sampling left out
            return
        # Microseconds, as milliseconds with 3 decimals (round(x, 3) costs ~0.5 µs more).
        latency_ms = int((_perf_counter() - started) * 1_000_000 + 0.5) / 1000
        try:
            model = self.model
            usage = None
            if isinstance(response, dict):
                usage = response.get("usage")
                if model is None:
                    model = response.get("model")
            metadata = recorder.metadata
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
            record["host"] = self.host
            record["endpoint"] = self.endpoint
            record["status_code"] = status_code
            record["usage"] = usage
            record["stream"] = stream
            record["ttft_ms"] = ttft_ms
            if self.client_request_id is not None:
                record["client_request_id"] = self.client_request_id
            if error is not None:
                record["error_detail"] = error_details(error)
            if stream_end is not None:
                record["chunks"] = chunks
                record["stream_end"] = stream_end
            if extra:
                record.update(extra)
            if recorder.record_observer is not None:
                recorder.record_observer(record)
            if capture is not None:
                kept = capture.apply(record)
                if kept is None:
                    return
                record = kept
            media = recorder.media
            if media is not None:
                # A blob is at least `min_chars` characters of one JSON string, so JSON shorter
                # than that holds none: most chats skip the walk on two integer comparisons.
                min_chars = media.min_chars
                in_request = self.body_bytes >= min_chars
                in_reply = reply_bytes is None or reply_bytes >= min_chars
                if (in_request or in_reply) and (
                    job := media.prepare(record, messages=in_request, response=in_reply)
                ) is not None:
                    ship = recorder.shipper_for(self.date, is_error, self.host)
                    media.defer(job, record, ship, recorder.logging_failed)
                    return
            try:  # orjson inline: plain JSON values are the common case, `encode_record` the rest
                data = _dumps(record)
            except TypeError:
                data = encode_record(record)
            if len(data) > recorder.max_record_bytes:
                data = shrink_record(record, len(data), recorder.max_record_bytes)
                recorder.records_truncated += 1
            # tuple.__new__ directly: the NamedTuple's own __new__ is a Python-level frame.
            sink.submit(_new_entry(RecordEntry, (self.date, self.host, is_error, data)))
        except Exception:
            recorder.logging_failed(self.request_id)
