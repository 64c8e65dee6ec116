"""The retention cron job (`VLLM_MW_RETENTION_DAYS`): once across the fleet, logged and counted.

After deleting partitions it deletes the media no remaining record references
(`_media_gc.py`, files older than `VLLM_MW_MEDIA_GRACE_DAYS`). That scan reads the whole tree, so
it runs only when partitions were deleted, or when an earlier scan was refused or failed (a
flag in Redis carries that over to a later tick, on any worker).

arq's `unique=True` cron already runs a tick on one worker only; a Redis lock (`SET NX PX`,
released only by its holder) also keeps a slow run from overlapping the next tick's, or a run
started by `vllm-mw worker` processes on several hosts sharing one log tree.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from vllm_middleware._media_gc import apply_media_gc, plan_media_gc
from vllm_middleware._retention import apply_retention, plan_retention
from vllm_middleware.storage import StreamKeys

from ._config import WorkerConfig

__all__ = ["retention_job", "run_retention"]

logger = logging.getLogger("vllm_middleware_worker")

_LOCK_TTL_MS = 3_600_000
# Release the lock only if it is still ours (it may have expired and been taken meanwhile).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def run_retention(redis: aioredis.Redis, config: WorkerConfig) -> dict[str, Any]:
    """Delete old partitions unless another worker is at it; counts go to the stats hash."""
    if config.retention_days <= 0:
        return {"skipped": "retention off"}
    keys = StreamKeys(config.stream)
    lock = f"{config.stream}:retention:lock"
    token = config.consumer.encode()
    if not await redis.set(lock, token, nx=True, px=_LOCK_TTL_MS):
        return {"skipped": "another worker holds the retention lock"}
    try:
        # Well above the writers' idle close: no file taken can still be open for appending.
        min_age = max(3600.0, 4 * config.file_idle_s)
        plan = await asyncio.to_thread(
            plan_retention, config.log_dir, config.retention_days, min_age_s=min_age
        )
        result = await asyncio.to_thread(apply_retention, plan)
        if result.deleted:
            pipe = redis.pipeline(transaction=True)
            pipe.hincrby(keys.stats, "retention_partitions_deleted", len(result.deleted))
            pipe.hincrby(keys.stats, "retention_files_deleted", result.files)
            pipe.hincrby(keys.stats, "retention_bytes_deleted", result.bytes)
            await pipe.execute()
            logger.info(
                "retention: deleted %d partitions before %s (%d files, %d bytes): %s",
                len(result.deleted),
                plan.cutoff,
                result.files,
                result.bytes,
                ", ".join(result.deleted),
            )
        for error in result.errors:
            logger.warning("retention: %s", error)
        report: dict[str, Any] = {
            "deleted": result.deleted,
            "bytes": result.bytes,
            "errors": result.errors,
        }
        if config.media_grace_days > 0:
            report["media"] = await _media_retention(redis, config, bool(result.deleted))
        return report
    finally:
        await redis.eval(_RELEASE, 1, lock, token)


async def _media_retention(
    redis: aioredis.Redis, config: WorkerConfig, partitions_deleted: bool
) -> dict[str, Any]:
    keys = StreamKeys(config.stream)
    pending = f"{config.stream}:retention:media_pending"
    if not partitions_deleted and not await redis.exists(pending):
        return {"skipped": "no partition deleted since the last complete scan"}
    await redis.set(pending, b"1")
    plan = await asyncio.to_thread(
        plan_media_gc, config.log_dir, grace_s=config.media_grace_days * 86400
    )
    if plan.refused is not None:
        logger.warning("retention: media kept: %s", plan.refused)
        return {"refused": plan.refused}
    result = await asyncio.to_thread(apply_media_gc, plan)
    for error in result.errors:
        logger.warning("retention: %s", error)
    if not result.errors:
        await redis.delete(pending)
    if result.deleted:
        pipe = redis.pipeline(transaction=True)
        pipe.hincrby(keys.stats, "retention_media_deleted", result.deleted)
        pipe.hincrby(keys.stats, "retention_media_bytes_deleted", result.bytes)
        await pipe.execute()
        logger.info(
            "retention: deleted %d media files no record references (%d bytes)",
            result.deleted,
            result.bytes,
        )
    return {"deleted": result.deleted, "bytes": result.bytes, "errors": result.errors}


async def retention_job(ctx: dict[str, Any]) -> dict[str, Any]:
    """arq cron job: `run_retention` with the worker's own client and settings."""
    return await run_retention(ctx["vllm_mw_redis"], ctx["vllm_mw_config"])
