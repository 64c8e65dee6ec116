"""The compaction and compression cron jobs (`VLLM_MW_COMPACT`, `VLLM_MW_COMPRESS`; both off by
default): each day is done by one worker of the fleet at a time.

arq's `unique=True` cron runs a tick on one worker of those sharing a Redis queue; workers on
several hosts (or started apart) sharing one log tree are kept apart by a Redis lock per day and
job (`SET NX PX`, renewed while the day is worked on, released only by its holder): a worker
that dies lets its lock expire and another takes the day at a later tick.

A run waits while a dead worker's intent is still in the inflight hash: its batch may sit,
unacknowledged, in a file old enough to be taken (the fleet was down for a while), and recovery
must cut it before anything else reads that file (or its records would be in the compressed or
Parquet file and written again by the worker that claims them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from vllm_middleware.storage import StreamKeys, is_valid_date

from ._config import WorkerConfig

__all__ = ["DayLock", "compact_job", "compress_job", "run_compaction", "run_compression"]

logger = logging.getLogger("vllm_middleware_worker")

LOCK_TTL_MS = 600_000
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_PLAIN = (".jsonl", ".json")
_COMPACTABLE = (".jsonl", ".jsonl.gz")


class DayLock:
    """A Redis lock that expires unless its holder renews it (every third of `ttl_ms`)."""

    def __init__(self, redis: aioredis.Redis, key: str, owner: str, ttl_ms: int = LOCK_TTL_MS):
        self.redis = redis
        self.key = key
        self.token = f"{owner}:{os.urandom(8).hex()}".encode()
        self.ttl_ms = ttl_ms

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[bool]:
        """Yields whether the lock was taken; renews it meanwhile, releases it at the end."""
        if not await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            yield False
            return
        renewer = asyncio.create_task(self._renew())
        try:
            yield True
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self.redis.eval(_RELEASE, 1, self.key, self.token)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            with contextlib.suppress(OSError, aioredis.RedisError):
                await self.redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)


def _days_with(root: Path, suffixes: tuple[str, ...], before: str | None) -> list[str]:
    """Days (all, or those before `before`) holding a file a job may take (cheap: listings)."""
    days = []
    with contextlib.suppress(FileNotFoundError), os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            day = entry.name[5:]
            if not (entry.name.startswith("date=") and is_valid_date(day)):
                continue
            if (before is not None and day >= before) or not entry.is_dir(follow_symlinks=False):
                continue
            if any(_holds(host, suffixes) for host in Path(entry.path).glob("host=*")):
                days.append(day)
    return days


def _holds(host: Path, suffixes: tuple[str, ...]) -> bool:
    if host.is_symlink() or not host.is_dir():
        return False
    try:
        names = os.listdir(host)
    except OSError:
        return False
    return any(n.endswith(suffixes) and not n.startswith((".", "_")) for n in names)


async def _recovery_pending(redis: aioredis.Redis, keys: StreamKeys) -> str | None:
    """A consumer that has an intent but no heartbeat (recovery has yet to cut its batch)."""
    for field in await redis.hkeys(keys.inflight):
        name = (field.decode() if isinstance(field, bytes) else str(field)).split("\x00")[0]
        if not await redis.exists(keys.heartbeat(name)):
            return name
    return None


def _min_age(config: WorkerConfig) -> float:
    # Well above the writers' idle close: no file taken can still be open for appending.
    return max(3600.0, 4 * config.file_idle_s)


async def run_compaction(redis: aioredis.Redis, config: WorkerConfig) -> dict[str, Any]:
    """Compact every closed day that has JSONL, each under its own lock."""
    if not config.compact:
        return {"skipped": "compaction off"}
    from vllm_middleware._compact import compact_tree

    keys = StreamKeys(config.stream)
    if (dead := await _recovery_pending(redis, keys)) is not None:
        return {"skipped": f"waiting for the recovery of dead worker {dead!r}"}
    today = datetime.now(UTC).date().isoformat()
    days = await asyncio.to_thread(_days_with, Path(config.log_dir), _COMPACTABLE, today)
    done: list[str] = []
    busy: list[str] = []
    records = 0
    for day in days:
        lock = DayLock(redis, f"{config.stream}:compact:lock:{day}", config.consumer)
        async with lock.held() as mine:
            if not mine:
                busy.append(day)
                continue
            result = await asyncio.to_thread(
                compact_tree, config.log_dir, day=day, min_age_s=_min_age(config)
            )
        for error in result.errors:
            logger.warning("compaction: %s", error)
        if result.compacted:
            done += result.compacted
            records += result.records
            pipe = redis.pipeline(transaction=True)
            pipe.hincrby(keys.stats, "compaction_partitions", len(result.compacted))
            pipe.hincrby(keys.stats, "compaction_records", result.records)
            await pipe.execute()
            logger.info(
                "compaction: %s: %d partitions, %d records, %d -> %d bytes",
                day,
                len(result.compacted),
                result.records,
                result.source_bytes,
                result.parquet_bytes,
            )
    return {"compacted": done, "records": records, "locked_elsewhere": busy}


async def run_compression(redis: aioredis.Redis, config: WorkerConfig) -> dict[str, Any]:
    """Gzip the closed files of every day that has plain ones, each day under its own lock."""
    if not config.compress:
        return {"skipped": "compression off"}
    from vllm_middleware._compress import compress_tree

    keys = StreamKeys(config.stream)
    if (dead := await _recovery_pending(redis, keys)) is not None:
        return {"skipped": f"waiting for the recovery of dead worker {dead!r}"}
    days = await asyncio.to_thread(_days_with, Path(config.log_dir), _PLAIN, None)
    files = saved = 0
    busy: list[str] = []
    for day in days:
        lock = DayLock(redis, f"{config.stream}:compress:lock:{day}", config.consumer)
        async with lock.held() as mine:
            if not mine:
                busy.append(day)
                continue
            result = await asyncio.to_thread(
                compress_tree, config.log_dir, day=day, min_age_s=_min_age(config)
            )
        for error in result.errors:
            logger.warning("compression: %s", error)
        if result.compressed:
            files += result.compressed
            saved += result.bytes_before - result.bytes_after
            pipe = redis.pipeline(transaction=True)
            pipe.hincrby(keys.stats, "compression_files", result.compressed)
            pipe.hincrby(
                keys.stats, "compression_bytes_saved", result.bytes_before - result.bytes_after
            )
            await pipe.execute()
            logger.info(
                "compression: %s: %d files, %d -> %d bytes",
                day,
                result.compressed,
                result.bytes_before,
                result.bytes_after,
            )
    return {"compressed": files, "bytes_saved": saved, "locked_elsewhere": busy}


async def compact_job(ctx: dict[str, Any]) -> dict[str, Any]:
    """arq cron job: `run_compaction` with the worker's own client and settings."""
    return await run_compaction(ctx["vllm_mw_redis"], ctx["vllm_mw_config"])


async def compress_job(ctx: dict[str, Any]) -> dict[str, Any]:
    """arq cron job: `run_compression` with the worker's own client and settings."""
    return await run_compression(ctx["vllm_mw_redis"], ctx["vllm_mw_config"])
