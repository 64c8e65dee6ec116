"""vllm-middleware's worker: drains the `vllm:logs` stream into partitioned JSONL files.

Run with `arq vllm_middleware_worker.WorkerSettings` or `vllm-mw worker`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ._compact_job import compact_job, compress_job
from ._config import WorkerConfig
from ._consumer import ConsumerStatus, StreamConsumer
from ._jobs import aggregate_file_stats, publish_file_stats
from ._retention_job import retention_job
from ._service import on_shutdown, on_startup, open_consumer_redis

__all__ = [
    "ConsumerStatus",
    "StreamConsumer",
    "WorkerConfig",
    "WorkerSettings",
    "aggregate_file_stats",
    "make_worker_settings",
    "on_shutdown",
    "on_startup",
    "open_consumer_redis",
    "publish_file_stats",
]


def make_worker_settings(config: WorkerConfig | None = None) -> type:
    """An arq settings class for `config` (default: from the environment)."""
    from arq import cron
    from arq.connections import RedisSettings

    cfg = config or WorkerConfig.from_env()
    seconds = set(range(0, 60, max(1, min(cfg.stats_interval_s, 60))))

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["vllm_mw_config"] = cfg
        await on_startup(ctx)

    class Settings:
        redis_settings = RedisSettings.from_dsn(cfg.redis_url)
        functions: ClassVar[list[Any]] = []
        cron_jobs: ClassVar[list[Any]] = [
            cron(aggregate_file_stats, second=seconds, unique=True, run_at_startup=False),
            *retention_cron(cfg),
            *maintenance_crons(cfg),
        ]
        on_startup = staticmethod(startup)
        on_shutdown = staticmethod(on_shutdown)
        # arq's own queue only runs the cron job; keep its polling cheap.
        poll_delay = 1.0
        health_check_interval = 30
        queue_name = f"{cfg.stream}:arq"

    return Settings


def retention_cron(cfg: WorkerConfig) -> list[Any]:
    """Hourly retention (minute 7), when `retention_days` is set."""
    from arq import cron

    if cfg.retention_days <= 0:
        return []
    return [cron(retention_job, minute={7}, second={0}, unique=True, run_at_startup=True)]


def maintenance_crons(cfg: WorkerConfig) -> list[Any]:
    """Compression (minute 23) and compaction (minute 37): at start-up and hourly, when on."""
    from arq import cron

    jobs = []
    if cfg.compress:
        jobs.append(cron(compress_job, minute={23}, second={0}, unique=True, run_at_startup=True))
    if cfg.compact:
        from vllm_middleware._compact import check_duckdb

        check_duckdb()  # refuse to start without the [analytics] extra, not fail every hour
        jobs.append(cron(compact_job, minute={37}, second={0}, unique=True, run_at_startup=True))
    return jobs


def __getattr__(name: str) -> Any:
    # Built on first access so importing the package does not read the environment or need arq.
    if name == "WorkerSettings":
        settings = make_worker_settings()
        globals()["WorkerSettings"] = settings
        return settings
    raise AttributeError(name)
