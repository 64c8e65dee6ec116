"""Statistics: exact counters kept in Redis by the workers, or a scan of the files when embedded."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis

from ._keys import StreamKeys
from ._media import MediaPipeline
from ._reader import iter_log_files, iter_logs
from ._sinks._shipping import Shipper

__all__ = [
    "ClientStatistics",
    "TreeSize",
    "get_statistics",
    "local_statistics",
    "read_statistics",
    "read_statistics_sync",
    "scan_log_tree",
]

_MB = 1024 * 1024


def local_statistics(
    mode: str,
    requests: int,
    sink: Shipper | None,
    media: MediaPipeline | None,
    *,
    logging_errors: int,
    truncated: int,
    media_policy: str,
) -> dict[str, Any]:
    """This process's own counters: `get_statistics()["client"]`."""
    counters = sink.counters if sink is not None else None
    return {
        "mode": mode,
        "requests": requests,
        "buffered": sink.buffered if sink is not None else 0,
        "submitted": counters.submitted if counters else 0,
        "shipped": counters.shipped if counters else 0,
        "dropped": counters.dropped if counters else 0,
        "failed_batches": counters.failed_batches if counters else 0,
        "last_error": counters.last_error if counters else None,
        "spooled": counters.spooled if counters else 0,
        "replayed": counters.replayed if counters else 0,
        "spool_damaged": counters.spool_damaged if counters else 0,
        "spool_bytes": counters.spool_bytes if counters else 0,
        "redis_healthy": getattr(sink, "healthy", None),
        "logging_errors": logging_errors,
        "truncated": truncated + (media.truncated if media else 0),
        "media_policy": media_policy,
        **(media.statistics() if media else {}),
    }


def _integer(value: str) -> int | None:
    # What Redis's HINCRBY itself accepts; anything else was written by someone else.
    try:
        number = int(value)
    except ValueError:
        return None
    return number if str(number) == value and abs(number) < 2**63 else None


def _as_int(raw: Mapping[str, str], key: str) -> int:
    return _integer(raw.get(key, "0")) or 0


def _iso_utc(epoch: str | None) -> str | None:
    """The workers store the scan time as epoch seconds; readers get ISO-8601 UTC text."""
    try:
        moment = datetime.fromtimestamp(float(epoch or ""), tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return moment.isoformat(timespec="milliseconds")


def _prefixed(raw: Mapping[str, str], prefix: str) -> dict[str, int]:
    found = {k[len(prefix) :]: _integer(v) for k, v in sorted(raw.items()) if k.startswith(prefix)}
    return {k: v for k, v in found.items() if v is not None}


# Fields the stats readers parse as integers; the rest (`log_dir`, `scanned_at`) are text.
_TEXT_FIELDS = frozenset({"log_dir", "scanned_at"})


def damaged_fields(raw: Mapping[str, str]) -> dict[str, str]:
    """Counters that do not hold an integer (the workers then refuse to acknowledge batches
    whose counters they would increment): the field and the start of its value."""
    return {
        key: value[:64]
        for key, value in sorted(raw.items())
        if key not in _TEXT_FIELDS and _integer(value) is None
    }


def _decode(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }


def build_redis_statistics(
    raw_hash: Mapping[Any, Any],
    stream_length: int,
    groups: list[Any],
    refused_hash: Mapping[Any, Any] | None = None,
) -> dict[str, Any]:
    raw = _decode(raw_hash)
    # Intents a worker would not act on (`vllm_middleware_worker._recovery`): left for a person.
    refused = _decode(refused_hash or {})
    pending = lag = 0
    for group in groups:
        info = _decode(group) if isinstance(group, Mapping) else {}
        pending += int(info.get("pending", 0) or 0)
        lag += int(info.get("lag", 0) or 0) if info.get("lag") not in (None, "None") else 0
    return {
        "total_requests": _as_int(raw, "requests"),
        "log_directory": raw.get("log_dir"),
        "logging_enabled": True,
        "log_files_count": _as_int(raw, "files_count"),
        "total_log_size_mb": round(_as_int(raw, "size_bytes") / _MB, 3),
        "mode": "redis",
        "total_errors": _as_int(raw, "errors"),
        "bytes_written": _as_int(raw, "bytes"),
        "files_created": _as_int(raw, "files_created"),
        "dropped_records": _as_int(raw, "dropped"),
        "sampled_out": _as_int(raw, "sampled_out"),
        "dead_letters": _as_int(raw, "dead_letters"),
        "spool_damaged": _as_int(raw, "spool_damaged"),
        "worker_write_errors": _as_int(raw, "worker_write_errors"),
        "worker_ack_errors": _as_int(raw, "worker_ack_errors"),
        "files_scanned_at": _iso_utc(raw.get("scanned_at")),
        "stream_length": stream_length,
        "pending": pending,
        "lag": lag,
        "by_date": _prefixed(raw, "requests:date:"),
        "by_host": _prefixed(raw, "requests:host:"),
        "damaged_fields": damaged_fields(raw),
        "refused_intents": refused,
    }


def read_statistics_sync(client: redis.Redis, keys: StreamKeys) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.stats)
    pipe.xlen(keys.stream)
    pipe.hgetall(keys.refused)
    raw_hash, length, refused = pipe.execute()
    try:
        groups = client.xinfo_groups(keys.stream)
    except redis.ResponseError:  # no stream yet
        groups = []
    return build_redis_statistics(raw_hash, int(length), list(groups), refused)


async def read_statistics(client: aioredis.Redis, keys: StreamKeys) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.stats)
    pipe.xlen(keys.stream)
    pipe.hgetall(keys.refused)
    raw_hash, length, refused = await pipe.execute()
    try:
        groups: Any = await client.xinfo_groups(keys.stream)
    except redis.ResponseError:
        groups = []
    return build_redis_statistics(raw_hash, int(length), list(groups), refused)


class TreeSize(NamedTuple):
    files: int
    bytes: int


def scan_log_tree(log_dir: str | os.PathLike[str]) -> TreeSize:
    """The log files under `log_dir` and their total size; zeros if it does not exist yet."""
    if not Path(log_dir).is_dir():
        return TreeSize(0, 0)
    count = size = 0
    for path in iter_log_files(log_dir):
        try:
            size += path.lstat().st_size  # links are not listed; never follow one
        except FileNotFoundError:  # removed by retention between listing and stat
            continue
        count += 1
    return TreeSize(count, size)


def file_statistics(log_dir: str | os.PathLike[str], *, count_records: bool) -> dict[str, Any]:
    count, size = scan_log_tree(log_dir)
    stats: dict[str, Any] = {
        "total_requests": None,
        "log_directory": str(log_dir),
        "logging_enabled": True,
        "log_files_count": count,
        "total_log_size_mb": round(size / _MB, 3),
        "mode": "embedded",
    }
    if count_records and count:
        total = errors = 0
        for record in iter_logs(log_dir):
            total += 1
            errors += record.get("error") is not None
        stats.update(total_requests=total, total_errors=errors)
    elif count_records:
        stats.update(total_requests=0, total_errors=0)
    return stats


def get_statistics(
    redis_url: str | None = None,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    stream: str = "vllm:logs",
) -> dict[str, Any]:
    """Pipeline statistics for ops scripts.

    With a Redis URL (argument or `VLLM_MW_REDIS_URL`): the workers' exact counters, O(1).
    Without one: a scan of `log_dir` (default `VLLM_MW_LOG_DIR` or `./logs/vllm`), which counts
    the records in the files.
    """
    url = redis_url or os.environ.get("VLLM_MW_REDIS_URL")
    if url:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            stats = read_statistics_sync(client, StreamKeys(stream))
        finally:
            client.close()
        if log_dir is not None and stats["log_directory"] is None:
            stats["log_directory"] = str(log_dir)
        return stats
    directory = log_dir or os.environ.get("VLLM_MW_LOG_DIR") or "./logs/vllm"
    return file_statistics(directory, count_records=True)


class ClientStatistics:
    """What `VLLMMiddleware.get_statistics` reads: Redis counters or a scan, plus local ones.

    The synchronous `read` (the original API is synchronous) uses its own small blocking Redis
    client, made on first use from the URL or from the injected async client's settings.
    """

    def __init__(
        self,
        *,
        log_dir: str,
        logging_enabled: bool,
        keys: StreamKeys,
        redis_client: aioredis.Redis | None,
        redis_url: str | None,
    ) -> None:
        self.log_dir = log_dir
        self.logging_enabled = logging_enabled
        self.keys = keys
        self._redis = redis_client
        self._redis_url = redis_url
        self._sync: redis.Redis | None = None

    def read(self, local: dict[str, Any], requests: int) -> dict[str, Any]:
        if self._redis is None:
            stats = file_statistics(self.log_dir, count_records=False)
            stats["total_requests"] = requests
        else:
            try:
                stats = read_statistics_sync(self._sync_client(), self.keys)
            except redis.RedisError as exc:
                stats = _redis_failure(exc)
        return self._finish(stats, local)

    async def aread(self, local: dict[str, Any], requests: int) -> dict[str, Any]:
        if self._redis is None:
            return await asyncio.to_thread(self.read, local, requests)
        try:
            stats = await read_statistics(self._redis, self.keys)
        except redis.RedisError as exc:
            stats = _redis_failure(exc)
        return self._finish(stats, local)

    def _finish(self, stats: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
        stats["logging_enabled"] = self.logging_enabled
        if stats.get("log_directory") is None:
            stats["log_directory"] = self.log_dir
        stats.setdefault("log_files_count", 0)
        stats.setdefault("total_log_size_mb", 0.0)
        stats["client"] = local
        return stats

    def _sync_client(self) -> redis.Redis:
        if self._sync is None:
            timeouts = {"socket_timeout": 2, "socket_connect_timeout": 2}
            if self._redis_url:
                self._sync = redis.Redis.from_url(self._redis_url, **timeouts)
            else:
                assert self._redis is not None
                kwargs = self._redis.connection_pool.connection_kwargs
                allowed = ("host", "port", "db", "username", "password", "path")
                self._sync = redis.Redis(
                    **{k: kwargs[k] for k in allowed if k in kwargs}, **timeouts
                )
        return self._sync

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def _redis_failure(exc: Exception) -> dict[str, Any]:
    return {"total_requests": None, "redis_error": f"{type(exc).__name__}: {exc}"}
