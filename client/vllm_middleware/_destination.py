"""Where a client's records go: a Redis stream or the embedded files, plus the media store.

Chosen once, when the client is built, from its settings; the request path only sees the
resulting `Shipper` and `MediaPipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import redis.asyncio as aioredis

from ._file_sink import FileSink
from ._keys import StreamKeys
from ._media import MediaPipeline, MediaPolicy, media_pipeline
from ._modes import LOG_MODES, FileModes
from ._partition import LogFormat
from ._redis_sink import RedisStreamSink
from ._shipping import Shipper, ShippingSettings

__all__ = ["Destination", "mode_of", "open_destination"]


@dataclass
class Destination:
    sink: Shipper
    media: MediaPipeline | None
    redis: aioredis.Redis | None  # the client the sink writes with (Redis mode only)
    durable: bool  # calls wait until their record left memory


def mode_of(sink: Shipper | None) -> str:
    if sink is None:
        return "disabled"
    return "redis" if isinstance(sink, RedisStreamSink) else "embedded"


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
    if redis_client is not None or redis_url:
        owns = redis_client is None
        if redis_client is None:
            assert redis_url is not None
            redis_client = aioredis.Redis.from_url(
                redis_url, socket_timeout=5, socket_connect_timeout=2
            )
        sink = RedisStreamSink(redis_client, keys=keys, owns_client=owns, shipping=shipping)
    else:
        sink = FileSink(
            log_dir,
            max_bytes=int(max_log_size_mb * 1024 * 1024),
            log_format=log_format,
            fsync=fsync,
            shipping=shipping,
            modes=modes,
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
    return Destination(sink, media, redis_client, shipping.durable)
