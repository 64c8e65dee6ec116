"""Periodic jobs run by arq's cron (one worker of the fleet per tick)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from vllm_middleware._stats import scan_log_tree
from vllm_middleware.storage import StreamKeys

from ._config import WorkerConfig

__all__ = ["aggregate_file_stats", "publish_file_stats"]

logger = logging.getLogger("vllm_middleware_worker")


async def publish_file_stats(redis: aioredis.Redis, config: WorkerConfig) -> dict[str, Any]:
    """Scan the log tree and store file count and size in the stats hash."""
    count, size = await asyncio.to_thread(scan_log_tree, config.log_dir)
    values = {
        "files_count": count,
        "size_bytes": size,
        "scanned_at": f"{time.time():.3f}",
        "log_dir": config.log_dir,
    }
    await redis.hset(StreamKeys(config.stream).stats, mapping=values)
    return values


async def aggregate_file_stats(ctx: dict[str, Any]) -> dict[str, Any]:
    """arq cron job: `publish_file_stats` with the worker's own client and settings.

    Logs a line when the figures changed since this worker's last run (arq's own lines for
    this job are filtered out, so an idle worker stays quiet).
    """
    config = ctx["vllm_mw_config"]
    values = await publish_file_stats(ctx["vllm_mw_redis"], config)
    figures = (values["files_count"], values["size_bytes"])
    if ctx.get("vllm_mw_file_figures") != figures:
        ctx["vllm_mw_file_figures"] = figures
        logger.info(
            "log tree %s: %d files, %.1f MB", config.log_dir, figures[0], figures[1] / 2**20
        )
    return values
