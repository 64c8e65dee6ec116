"""An idle worker is quiet: the file-statistics cron job logs only when the figures change."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import WorkerConfig, aggregate_file_stats
from vllm_middleware_worker._service import install_quiet_cron_logging


async def test_idle_cron_runs_log_nothing_and_a_change_logs_one_line(
    tmp_path: Path, redis_server: RedisServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    logs = tmp_path / "logs"
    (logs / "date=2026-11-30" / "host=a").mkdir(parents=True)
    config = WorkerConfig(redis_url=redis_server.url, log_dir=str(logs), consumer="w1")
    client = aioredis.Redis.from_url(redis_server.url)
    ctx = {"vllm_mw_redis": client, "vllm_mw_config": config}
    install_quiet_cron_logging()
    arq_logger = logging.getLogger("arq.worker")
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(3):  # what arq logs around each run, and the run itself
                arq_logger.info("%6.2fs → %s(%s)%s", 0.01, "cron:aggregate_file_stats", "", "")
                await aggregate_file_stats(ctx)
                arq_logger.info("%6.2fs ← %s ● %s", 0.0, "cron:aggregate_file_stats", "{}")
            first = [r.getMessage() for r in caplog.records]
            (logs / "date=2026-11-30" / "host=a" / "w1-000001.jsonl").write_bytes(b"{}\n")
            await aggregate_file_stats(ctx)
            await aggregate_file_stats(ctx)
            arq_logger.error("%6.2fs ! %s failed", 0.0, "cron:aggregate_file_stats")
    finally:
        await client.aclose()
    # The first run reports the tree once; later identical runs and arq's lines are silent.
    assert first == [f"log tree {logs}: 0 files, 0.0 MB"]
    later = [r.getMessage() for r in caplog.records][len(first) :]
    assert later == [
        f"log tree {logs}: 1 files, 0.0 MB",
        "  0.00s ! cron:aggregate_file_stats failed",
    ]
