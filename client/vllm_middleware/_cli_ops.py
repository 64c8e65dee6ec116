"""The operator's subcommands of `vllm-mw`: `health` (and the dead-letter and spool tools).

Kept apart from `_cli.py`, which only calls `add_ops_commands`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ._health import EXIT_CODES, Thresholds, check_health

__all__ = ["add_ops_commands", "redis_url_from"]

_DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url_from(args: argparse.Namespace) -> str:
    return str(args.redis_url or os.environ.get("VLLM_MW_REDIS_URL") or _DEFAULT_REDIS_URL)


def add_ops_commands(commands: Any) -> None:
    """Add `health` to the `vllm-mw` subparsers."""
    health = commands.add_parser(
        "health",
        help="pipeline health; exit 0 healthy, 1 degraded, 2 down",
        description="Exit code 0 healthy, 1 degraded (reasons printed), 2 down.",
    )
    _add_redis_arguments(health)
    defaults = Thresholds()
    health.add_argument("--json", action="store_true", help="print the full report as JSON")
    health.add_argument(
        "--host", help="only this host's workers count; none alive there means down"
    )
    health.add_argument("--spool-dir", help="spool root to inspect (env VLLM_MW_SPOOL_DIR)")
    health.add_argument("--timeout", type=float, default=5.0, help="Redis timeout, seconds")
    health.add_argument("--max-lag", type=int, default=defaults.max_lag_records)
    health.add_argument("--max-pending", type=int, default=defaults.max_pending_records)
    health.add_argument(
        "--max-age",
        type=float,
        default=defaults.max_unwritten_age_s,
        help="oldest unwritten record, seconds",
    )
    health.add_argument("--max-dead-letters", type=int, default=defaults.max_dead_letters)
    health.add_argument(
        "--max-memory",
        type=float,
        default=defaults.max_memory_ratio,
        help="Redis used_memory / maxmemory",
    )
    health.add_argument(
        "--max-spool-age",
        type=float,
        default=defaults.max_spool_age_s,
        help="age of a stranded spool, seconds",
    )
    health.add_argument("--min-workers", type=int, default=defaults.min_workers)
    health.set_defaults(handler=_cmd_health)


def _add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (env VLLM_MW_REDIS_URL)")
    parser.add_argument("--stream", default=os.environ.get("VLLM_MW_STREAM", "vllm:logs"))


def _cmd_health(args: argparse.Namespace) -> int:
    thresholds = Thresholds(
        max_lag_records=args.max_lag,
        max_pending_records=args.max_pending,
        max_unwritten_age_s=args.max_age,
        max_dead_letters=args.max_dead_letters,
        max_memory_ratio=args.max_memory,
        max_spool_age_s=args.max_spool_age,
        min_workers=args.min_workers,
    )
    report = check_health(
        redis_url_from(args),
        stream=args.stream,
        thresholds=thresholds,
        host=args.host,
        spool_dir=args.spool_dir,
        timeout=args.timeout,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_health(report)
    return EXIT_CODES[report["status"]]


def _print_health(report: dict[str, Any]) -> None:
    print(f"{report['status'].upper()}  ({report['redis_url']})")
    for reason in report["reasons"]:
        print(f"  - {reason}")
    if not report["reachable"]:
        return
    used, maximum = report["used_memory"], report["maxmemory"]
    limit = f"{maximum / 2**20:.1f} MB" if maximum else "no maxmemory"
    print(f"redis memory   {used / 2**20:.1f} MB of {limit}")
    lag = f"{report['lag']}{' (estimated)' if report['lag_estimated'] else ''}"
    pending = report["pending"]
    print(f"stream         {report['stream_length']} entries, lag {lag}, pending {pending}")
    print(f"oldest unwritten {report['oldest_unwritten_age_s']} s")
    print(f"dead letters   {report['dead_letters']}")
    print(f"workers        {len(report['workers'])} alive")
    for worker in report["workers"]:
        age = worker["last_batch_age_s"]
        last = "no batch yet" if age is None else f"last batch {age:.1f} s ago"
        print(f"  {worker['consumer']}  host={worker['host']}  {worker['state']}  {last}")
    for dead in report["consumers_without_heartbeat"]:
        print(f"  {dead['consumer']}  no heartbeat, {dead['pending']} pending (being recovered)")
    for spool in report["spools"]:
        print(
            f"spool          {spool['path']}: {spool['segments']} segments, {spool['bytes']} bytes,"
            f" {spool['stranded_segments']} stranded"
        )
    counters = ", ".join(f"{k} {v}" for k, v in report["counters"].items())
    print(f"counters       {counters}")
