"""`vllm-mw worker`: run a worker under arq, or drain the stream once (`--burst`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence

from redis.exceptions import RedisError
from vllm_middleware import ConfigurationError
from vllm_middleware._redis_url import argv_password_warning, mask_url

from ._config import WorkerConfig
from ._consumer import StreamConsumer
from ._jobs import publish_file_stats
from ._metrics import start_metrics_server
from ._preflight import check_log_dir
from ._service import open_consumer_redis

__all__ = ["add_arguments", "main", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        help="Redis URL (env VLLM_MW_REDIS_URL; password: VLLM_MW_REDIS_PASSWORD_FILE)",
    )
    parser.add_argument("--log-dir", help="root of the partitioned log tree (env VLLM_MW_LOG_DIR)")
    parser.add_argument("--max-log-size-mb", type=float, help="rotate files at this size")
    parser.add_argument("--log-format", choices=["jsonl", "json"])
    parser.add_argument("--stream", help="stream key (default vllm:logs)")
    parser.add_argument("--consumer", help="consumer name (default host-pid-random)")
    parser.add_argument("--batch-size", type=int, help="records per batch at most")
    parser.add_argument(
        "--metrics-port", type=int, help="serve /metrics (env VLLM_MW_METRICS_PORT)"
    )
    parser.add_argument(
        "--burst", action="store_true", help="drain the stream, then exit (no arq, no cron)"
    )
    parser.add_argument("--verbose", "-v", action="store_true")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    warning = argv_password_warning(args.redis_url)
    if warning:
        print(f"vllm-mw: warning: {warning}", file=sys.stderr)
    return WorkerConfig.from_env(
        redis_url=args.redis_url,
        log_dir=args.log_dir,
        max_log_size_mb=args.max_log_size_mb,
        log_format=args.log_format,
        stream=args.stream,
        consumer=args.consumer,
        batch_size=args.batch_size,
        metrics_port=args.metrics_port,
    )


async def _run_standalone(config: WorkerConfig, *, burst: bool) -> None:
    client = open_consumer_redis(config)
    consumer = StreamConsumer(client, config)
    metrics = start_metrics_server(consumer, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.stop)
    try:
        await consumer.run(burst=burst)
        await publish_file_stats(client, config)
    finally:
        if metrics is not None:
            metrics.close()
        await client.aclose()


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        check_log_dir(config.log_dir, config.modes.dir)
    except ConfigurationError as exc:
        print(f"vllm-mw: worker: {exc}", file=sys.stderr)
        return 2
    if args.burst:
        try:
            asyncio.run(_run_standalone(config, burst=True))
        except (RedisError, OSError) as exc:
            print(f"vllm-mw: worker: Redis at {mask_url(config.redis_url)}: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        from arq.worker import get_kwargs
    except ImportError:
        # Without arq the consumer still runs; only the cron jobs need arq.
        logging.getLogger("vllm_middleware_worker").warning(
            "arq is not installed (pip install 'vllm-middleware[worker]'): "
            "running the consumer without cron jobs"
        )
        asyncio.run(_run_standalone(config, burst=False))
        return 0
    from . import make_worker_settings
    from ._service import resilient_worker_class

    worker_class = resilient_worker_class()
    settings = make_worker_settings(config)
    delay = 1.0
    while True:
        worker = worker_class(**get_kwargs(settings))
        try:
            worker.run()
            return 0
        except (RedisError, OSError) as exc:
            if "vllm_mw_consumer" in worker.ctx:
                raise  # the consumer had started: exit and let the supervisor restart us
            # Redis is not up yet (arq's own retries are ~5 s): keep waiting for it rather
            # than exiting, so a worker started before Redis comes up by itself.
            logging.getLogger("vllm_middleware_worker").warning(
                "Redis at %s unreachable at start-up (%s); retrying in %.0f s",
                mask_url(config.redis_url),
                exc,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-mw worker", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
