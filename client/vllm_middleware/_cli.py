"""`vllm-mw`: the operator's command line (stats, worker, demo)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._exceptions import VLLMMiddlewareError
from ._stats import get_statistics

__all__ = ["main"]


def _print_stats(stats: dict[str, Any]) -> None:
    width = max(len(key) for key in stats)
    for key, value in stats.items():
        if isinstance(value, dict):
            print(f"{key:<{width}}")
            for sub_key, sub_value in value.items():
                print(f"  {sub_key:<{width}} {sub_value}")
        else:
            print(f"{key:<{width}} {value}")


def _cmd_stats(args: argparse.Namespace) -> int:
    stats = get_statistics(args.redis_url, log_dir=args.log_dir, stream=args.stream)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=False))
    else:
        _print_stats(stats)
    return 0


def _worker_cli() -> Any:
    # The worker is an optional extra that depends on this package, not the reverse: look it
    # up at run time only.
    try:
        return importlib.import_module("vllm_middleware_worker._cli")
    except ImportError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-mw", description="vllm-middleware operations")
    commands = parser.add_subparsers(dest="command", required=True)

    stats = commands.add_parser("stats", help="pipeline statistics (Redis, or a file scan)")
    stats.add_argument("--redis-url", help="Redis URL (env VLLM_MW_REDIS_URL)")
    stats.add_argument("--log-dir", help="log tree to scan when there is no Redis")
    stats.add_argument("--stream", default="vllm:logs")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(handler=_cmd_stats)

    worker_cli = _worker_cli()
    worker = commands.add_parser("worker", help="run a log worker (needs the [worker] extra)")
    if worker_cli is not None:
        worker_cli.add_arguments(worker)
        worker.set_defaults(handler=worker_cli.run_from_args)
    else:
        worker.set_defaults(handler=_no_worker)

    from ._demo import add_arguments as add_demo_arguments
    from ._demo import run as run_demo

    demo = commands.add_parser("demo", help="run the whole pipeline on this machine and show it")
    add_demo_arguments(demo)
    demo.set_defaults(handler=run_demo)

    from ._cli_ops import add_ops_commands

    add_ops_commands(commands)

    from ._cli_use import add_commands as add_use_commands

    add_use_commands(commands)  # tail, query, export

    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except VLLMMiddlewareError as exc:
        print(f"vllm-mw: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _no_worker(args: argparse.Namespace) -> int:
    print("vllm-mw worker needs the worker extra: pip install 'vllm-middleware[worker]'")
    return 2


if __name__ == "__main__":
    sys.exit(main())
