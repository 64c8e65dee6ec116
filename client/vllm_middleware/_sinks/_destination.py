"""Where a client's records go: a Redis stream or the embedded files, plus the media store.

Chosen once, when the client is built, from its settings; the request path only sees the
resulting `Shipper` and `MediaPipeline`. A shipper holds one sink: `FileSink`, or
`RedisStreamSink` wrapped in a `SpoolingSink` (unless the spool is turned off).

Sinks are shared: the clients of one process that write to one log directory (or one Redis
URL and stream) with the same settings use one sink (one buffer, one shipping thread; embedded,
one writer process and its files; Redis, one connection), so a client per request costs no
process start, no connection and leaves no file of its own. A client's close waits until its
records left memory and gives the sink back; the last one gives it `_IDLE_CLOSE_S` to be taken
again before it closes (and exit closes it in any case). An injected `redis_client` gets a sink
of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis

from .._keys import StreamKeys
from .._media import MediaPipeline, MediaPolicy, media_pipeline
from .._modes import LOG_MODES, FileModes
from .._partition import LogFormat
from ._file_sink import FileSink
from ._redis_sink import RedisStreamSink
from ._shipping import Shipper, ShippingSettings, Tally
from ._sink import Sink
from ._spooling_sink import SpoolingSink

__all__ = [
    "Destination",
    "collected_unclosed",
    "file_shipper",
    "mode_of",
    "open_destination",
    "redis_shipper",
]

logger = logging.getLogger("vllm_middleware")


@dataclass
class Destination:
    sink: Shipper
    media: MediaPipeline | None
    redis: aioredis.Redis | None  # the app's client for statistics (Redis mode only)
    durable: bool  # calls wait until their record left memory
    owns_redis: bool = False  # `redis` was made here (from the URL): closed with the rest
    release: Callable[[], None] | None = None  # gives a shared sink back (embedded)

    async def aclose(self, timeout: float) -> None:
        """The client's close: finish media work, get the records out of memory (and close a
        sink of its own, or give a shared one back), close the statistics client."""
        if self.media is not None:
            try:
                await self.media.drain(timeout)
            except Exception:  # closing must not fail the app either
                logger.exception("error while finishing media work")
        try:
            if self.release is None:
                await self.sink.aclose(timeout)
            else:  # a shared sink: this client's records out of memory, then let go
                await self.sink.settle(timeout)
        except Exception:  # closing must not fail the app either
            logger.exception("error while closing the log sink")
        finally:
            if self.release is not None:
                self.release()
                self.release = None
        if self.owns_redis and self.redis is not None:
            with contextlib.suppress(Exception):  # the statistics client: nothing to lose
                await self.redis.aclose()


def mode_of(shipper: Shipper | None) -> str:
    if shipper is None:
        return "disabled"
    return "embedded" if isinstance(shipper.sink, FileSink) else "redis"


def redis_shipper(
    redis: aioredis.Redis,
    *,
    keys: StreamKeys,
    owns_client: bool = False,
    shipping: ShippingSettings | None = None,
) -> Shipper:
    """A shipper to the Redis stream, through the spool when `shipping.spool` is on."""
    settings = shipping or ShippingSettings()
    tally = Tally()
    redis_sink = RedisStreamSink(
        redis, keys=keys, owns_client=owns_client, timeout=settings.redis_timeout
    )
    sink: Sink = SpoolingSink(redis_sink, settings, tally) if settings.spool else redis_sink
    return Shipper(sink, settings, tally)


def file_shipper(
    log_dir: str | os.PathLike[str],
    *,
    max_bytes: int,
    log_format: LogFormat = "jsonl",
    fsync: bool = True,
    shipping: ShippingSettings | None = None,
    modes: FileModes = LOG_MODES,
) -> Shipper:
    """A shipper to the embedded partitioned files (`FileSink`)."""
    settings = shipping or ShippingSettings()
    sink = FileSink(
        log_dir,
        max_bytes=max_bytes,
        log_format=log_format,
        fsync=fsync,
        writer=settings.embedded_writer,
        modes=modes,
    )
    return Shipper(sink, settings)


def open_destination(
    *,
    log_dir: str | os.PathLike[str],
    redis_url: str | None,
    redis_client: aioredis.Redis | None,
    keys: StreamKeys,
    shipping: ShippingSettings,
    durable: bool | None,
    max_log_size_mb: float,
    log_format: LogFormat,
    fsync: bool,
    media_policy: MediaPolicy,
    media_dir: str | os.PathLike[str] | None,
    media_min_bytes: int,
    max_record_bytes: int,
    modes: FileModes = LOG_MODES,
) -> Destination:
    """Redis mode when given a client or a URL, the embedded files otherwise."""
    if durable is not None:
        shipping = replace(shipping, durable=durable)
    sink: Shipper
    owns = False
    release = None
    if redis_client is not None:
        # The sink makes its own copy of the client (its I/O runs on the shipping loop);
        # `redis_client` stays the app's, for statistics.
        sink = redis_shipper(redis_client, keys=keys, owns_client=False, shipping=shipping)
    elif redis_url:
        owns = True
        redis_client = aioredis.Redis.from_url(
            redis_url, socket_timeout=5, socket_connect_timeout=2
        )
        url, client = redis_url, redis_client
        sink, release = _SHARED.acquire(
            ("redis", url, keys.stream, replace(shipping, durable=False)),
            lambda: redis_shipper(client, keys=keys, owns_client=False, shipping=shipping),
        )
    else:
        max_bytes = int(max_log_size_mb * 1024 * 1024)
        sink, release = _SHARED.acquire(
            (
                os.path.abspath(log_dir),
                max_bytes,
                log_format,
                fsync,
                modes,
                replace(shipping, durable=False),
            ),
            lambda: file_shipper(
                log_dir,
                max_bytes=max_bytes,
                log_format=log_format,
                fsync=fsync,
                shipping=shipping,
                modes=modes,
            ),
        )
    media = media_pipeline(
        media_policy,
        log_dir=str(log_dir),
        media_dir=media_dir,
        shared=redis_client is not None,
        min_bytes=media_min_bytes,
        max_record_bytes=max_record_bytes,
        fsync=fsync,
        modes=modes,
    )
    return Destination(sink, media, redis_client, shipping.durable, owns, release)


#: seconds a shared sink no client uses stays open, for the next client to take
_IDLE_CLOSE_S = 30.0


class _SharedSinks:
    """Sinks by destination and settings, with the number of clients using each."""

    def __init__(self) -> None:
        # Reentrant: a finalizer releasing a sink may run inside `acquire` (any allocation).
        self._lock = threading.RLock()
        self._sinks: dict[Any, tuple[Shipper, list[int]]] = {}

    def acquire(self, key: Any, make: Callable[[], Shipper]) -> tuple[Shipper, Callable[[], None]]:
        with self._lock:
            found = self._sinks.get(key)
            if found is None or found[0].closing:
                found = self._sinks[key] = (make(), [0])
            sink, users = found
            users[0] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                users[0] -= 1
                idle = users[0] == 0
            if idle:
                sink.close_later(_IDLE_CLOSE_S, lambda: self._forget_if_idle(key, sink))

        return sink, release

    def _forget_if_idle(self, key: Any, sink: Shipper) -> bool:
        """True (and no longer shared) when no client took `sink` again since."""
        with self._lock:
            found = self._sinks.get(key)
            if found is None or found[0] is not sink:
                return not sink.closing
            if found[1][0] > 0:
                return False
            del self._sinks[key]
            return True


_SHARED = _SharedSinks()


def collected_unclosed(destination: Destination | None, owner: str = "VLLMMiddleware") -> None:
    """A client garbage-collected without close: its buffered records are saved by the
    shipping thread (shipped, or spooled / written), not left to vanish with it."""
    if destination is None:
        return
    sink = destination.sink
    message = (
        f"{owner} ({mode_of(sink)}) was garbage-collected without close(); saving "
        f"{sink.buffered} buffered log records: use `with`/`async with`, or close it"
    )
    warnings.warn(message, ResourceWarning, stacklevel=2)
    logger.warning("%s", message)
    if destination.release is not None:  # the shared sink lives on, and ships them now
        sink.flush_soon()
        destination.release()
        destination.release = None
    else:
        sink.close_soon()
