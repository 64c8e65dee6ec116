"""The consumer as a service inside an arq worker: start, watch, stop.

arq has no Redis Streams support, so the consumer runs as a task started in `on_startup` and
stopped in `on_shutdown`. It gets its own Redis client (arq's pool has no socket timeout and
does not survive reconnects). If the task ever ends unexpectedly, the process exits non-zero so
a supervisor restarts it: a consumer must never die silently while arq's poll loop looks healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ._config import WorkerConfig
from ._consumer import StreamConsumer
from ._jobs import publish_file_stats
from ._metrics import start_metrics_server
from ._preflight import check_log_dir

__all__ = [
    "install_quiet_cron_logging",
    "on_shutdown",
    "on_startup",
    "open_consumer_redis",
    "resilient_worker_class",
]

logger = logging.getLogger("vllm_middleware_worker")

_EXIT_CONSUMER_DIED = 70


def open_consumer_redis(config: WorkerConfig) -> aioredis.Redis:
    # socket_timeout must exceed the XREADGROUP block, or every idle read would time out.
    return aioredis.Redis.from_url(
        config.redis_url,
        socket_timeout=config.block_ms / 1000 + 10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


async def on_startup(ctx: dict[str, Any]) -> None:
    config: WorkerConfig = ctx.get("vllm_mw_config") or WorkerConfig.from_env()
    # Refuse to start rather than take entries it cannot write.
    check_log_dir(config.log_dir, config.modes.dir)
    install_quiet_cron_logging()
    client = open_consumer_redis(config)
    consumer = StreamConsumer(client, config)
    ctx.update(vllm_mw_config=config, vllm_mw_redis=client, vllm_mw_consumer=consumer)
    ctx["vllm_mw_metrics"] = start_metrics_server(consumer, config)
    task = asyncio.create_task(consumer.run(), name="vllm-mw-consumer")
    task.add_done_callback(_exit_if_unexpected)
    ctx["vllm_mw_task"] = task
    try:
        await publish_file_stats(client, config)
    except Exception as exc:  # Redis not up yet: the cron job will publish later
        logger.warning("could not publish file statistics at start-up: %s", exc)
    logger.info("consumer %s writing to %s", config.consumer, config.log_dir)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    consumer: StreamConsumer | None = ctx.get("vllm_mw_consumer")
    task: asyncio.Task[None] | None = ctx.get("vllm_mw_task")
    if consumer is not None and task is not None:
        task.remove_done_callback(_exit_if_unexpected)
        consumer.stop()  # finishes and acknowledges the batch in hand, closes the files
        await task
    client: aioredis.Redis | None = ctx.get("vllm_mw_redis")
    if client is not None:
        await client.aclose()
    if (metrics := ctx.get("vllm_mw_metrics")) is not None:
        metrics.close()


def _exit_if_unexpected(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        reason = "was cancelled"
    elif task.exception() is not None:
        reason = f"failed: {task.exception()!r}"
    else:
        reason = "returned"
    logger.critical("the stream consumer %s; exiting so the worker is restarted", reason)
    os._exit(_EXIT_CONSUMER_DIED)


_POLL_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

# The file-statistics cron job runs every few seconds; arq logs a start and an end line for each
# run. The job logs a line itself when the figures change, so an idle worker is quiet.
_QUIET_JOBS = ("cron:aggregate_file_stats",)


class _QuietCronFilter(logging.Filter):
    """Drops arq's routine INFO lines (start, result) of `_QUIET_JOBS`; failures pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not isinstance(record.args, tuple):
            return True
        return not any(isinstance(arg, str) and arg in _QUIET_JOBS for arg in record.args)


def install_quiet_cron_logging() -> None:
    arq_logger = logging.getLogger("arq.worker")
    if not any(isinstance(f, _QuietCronFilter) for f in arq_logger.filters):
        arq_logger.addFilter(_QuietCronFilter())


def resilient_worker_class() -> type:
    """arq's `Worker`, made to outlive a Redis restart.

    arq's poll loop ends the worker on the first `ConnectionError` (arq issues #435, #498) and
    its `close` then fails before `on_shutdown`, so the consumer would be torn down mid-batch.
    Here a failed poll iteration (job queue, cron, health key) is logged and retried on the
    next tick (redis-py reconnects by itself), and `close` always runs `on_shutdown`.
    """
    from arq.worker import Worker

    class ResilientWorker(Worker):  # type: ignore[misc]
        poll_errors = 0

        async def _poll_iteration(self) -> None:
            try:
                await super()._poll_iteration()
            except _POLL_ERRORS as exc:
                ResilientWorker.poll_errors += 1
                count = ResilientWorker.poll_errors
                if count == 1 or count % 100 == 0:
                    logger.warning("arq poll failed (%d times so far), retrying: %s", count, exc)

        async def close(self) -> None:
            if not self._handle_signals:
                self.handle_sig(signal.SIGUSR1)  # as arq's own close does
            if not getattr(self, "_pool", None):
                return
            # SIGTERM cancels running jobs (a stats cron, say): their CancelledError must not
            # skip `on_shutdown`, which finishes the consumer's batch.
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            with contextlib.suppress(*_POLL_ERRORS):
                await self.pool.delete(self.health_check_key)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            with contextlib.suppress(*_POLL_ERRORS):
                await self.pool.close(close_connection_pool=True)
            self._pool = None

    return ResilientWorker
