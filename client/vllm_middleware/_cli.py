"""`vllm-mw`: the operator's command line (stats, worker, demo, proxy, and the ops and use
commands).

Every failure is one line on stderr, `vllm-mw: <what failed>: <why>`, with passwords in URLs
masked, and a non-zero exit; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import redis

from ._exceptions import VLLMMiddlewareError
from ._keys import StreamKeys
from ._redis_url import argv_password_warning, mask_url
from ._settings import ClientSettings
from ._stats import file_statistics, read_statistics_sync

__all__ = ["main"]

_EXIT_FAILED = 1
_EXIT_USAGE = 2


class _CommandFailed(VLLMMiddlewareError):
    """A command could not do its work; `str()` is the line printed after `vllm-mw: `."""


def _print_stats(stats: dict[str, Any]) -> None:
    width = max(len(key) for key in stats)
    for key, value in stats.items():
        if isinstance(value, dict):
            print(f"{key:<{width}}")
            for sub_key, sub_value in value.items():
                print(f"  {sub_key:<{width}} {sub_value}")
        else:
            print(f"{key:<{width}} {value}")


def _stats_from_redis(url: str, stream: str) -> dict[str, Any]:
    shown = mask_url(url)
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        keys = StreamKeys(stream)
        try:
            exists = client.exists(keys.stream)
            stats = read_statistics_sync(client, keys)
        except redis.RedisError as exc:
            raise _CommandFailed(f"stats: cannot read Redis at {shown}: {exc}") from exc
    finally:
        client.close()
    if not exists:
        raise _CommandFailed(
            f"stats: no stream {stream!r} at {shown} (no client or worker has used it; "
            "--stream names another)"
        )
    return {"source": f"redis {shown} stream {stream}", **stats}


def _stats_from_files(log_dir: str, given: bool) -> dict[str, Any]:
    path = Path(log_dir)
    how = "" if given else " (the default: give --log-dir, VLLM_MW_LOG_DIR or a Redis URL)"
    if not path.exists():
        raise _CommandFailed(f"stats: log directory {log_dir} does not exist{how}")
    if not path.is_dir():
        raise _CommandFailed(f"stats: {log_dir} is not a directory{how}")
    try:
        stats = file_statistics(path, count_records=True)
    except OSError as exc:
        raise _CommandFailed(f"stats: cannot read {log_dir}: {exc.strerror or exc}") from exc
    return {"source": f"files under {path.resolve()}", **stats}


def _cmd_stats(args: argparse.Namespace) -> int:
    warning = argv_password_warning(args.redis_url)
    if warning:
        print(f"vllm-mw: warning: {warning}", file=sys.stderr)
    settings = ClientSettings.load(redis_url=args.redis_url)
    env_dir = os.environ.get("VLLM_MW_LOG_DIR") or None
    if settings.redis_url:
        if args.log_dir is not None:
            origin = "--redis-url" if args.redis_url else "VLLM_MW_REDIS_URL"
            raise _CommandFailed(
                f"stats: --log-dir scans files but {origin} names a Redis "
                f"({mask_url(settings.redis_url)}): give one source"
            )
        stats = _stats_from_redis(settings.redis_url, args.stream or "vllm:logs")
    else:
        if args.stream is not None:
            raise _CommandFailed("stats: --stream needs a Redis URL (--redis-url)")
        log_dir = args.log_dir or env_dir
        stats = _stats_from_files(log_dir or "./logs/vllm", given=log_dir is not None)
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


def _demo_cli(argv: Sequence[str]) -> Any:
    # The demo starts the test doubles (fake vLLM, a private redis-server), which live in their
    # own package so that nothing on the client's import path loads them; and only the demo
    # command loads them, so other commands (health checks among them) start without them.
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command != "demo":
        return None
    try:
        return importlib.import_module("vllm_middleware_testing._demo")
    except ImportError:
        return None


def _version() -> str:
    try:
        return version("vllm-middleware")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-mw", description="vllm-middleware operations")
    parser.add_argument("--version", action="version", version=f"vllm-mw {_version()}")
    parser.add_argument(
        "--traceback",
        dest="show_traceback",
        action="store_true",
        help="on failure, print the traceback too (also: -v after a command)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    stats = commands.add_parser("stats", help="pipeline statistics (Redis, or a file scan)")
    stats.add_argument(
        "--redis-url",
        help="Redis URL (env VLLM_MW_REDIS_URL; password: VLLM_MW_REDIS_PASSWORD_FILE)",
    )
    stats.add_argument(
        "--log-dir", help="scan this log tree instead (env VLLM_MW_LOG_DIR); not with Redis"
    )
    stats.add_argument("--stream", help="stream key (default vllm:logs); Redis only")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.add_argument("--verbose", "-v", action="store_true", help="traceback on failure")
    stats.set_defaults(handler=_cmd_stats)

    worker_cli = _worker_cli()
    worker = commands.add_parser("worker", help="run a log worker (needs the [worker] extra)")
    if worker_cli is not None:
        worker_cli.add_arguments(worker)
        worker.set_defaults(handler=worker_cli.run_from_args)
    else:
        worker.set_defaults(handler=_no_worker)

    demo = commands.add_parser("demo", help="run the whole pipeline on this machine")
    demo_cli = _demo_cli(argv)
    if demo_cli is not None:
        demo_cli.add_arguments(demo)
        demo.add_argument("--verbose", "-v", action="store_true", help="traceback on failure")
        demo.set_defaults(handler=demo_cli.run)
    else:
        demo.set_defaults(handler=_no_demo)

    from ._proxy_cli import add_arguments as add_proxy_arguments
    from ._proxy_cli import run as run_proxy

    proxy = commands.add_parser(
        "proxy", help="an OpenAI-compatible logging proxy: apps change only their base URL"
    )
    add_proxy_arguments(proxy)
    proxy.set_defaults(handler=run_proxy)

    from ._cli_ops import add_ops_commands
    from ._cli_use import add_commands as add_use_commands

    add_ops_commands(commands)  # health, dead-letters, spool, retention, compact
    add_use_commands(commands)  # tail, query, export, report, ui
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv).parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except _CommandFailed as exc:
        _fail(args, str(exc))
        return _EXIT_FAILED
    except VLLMMiddlewareError as exc:  # bad settings or arguments
        _fail(args, f"{args.command}: {exc}")
        return _EXIT_USAGE
    except Exception as exc:
        _fail(args, f"{args.command}: {type(exc).__name__}: {mask_text(str(exc))}")
        return _EXIT_FAILED


def mask_text(text: str) -> str:
    """`text` with every URL's password masked (exception messages may quote URLs)."""
    return " ".join(mask_url(word) if "://" in word else word for word in text.split(" "))


def _fail(args: argparse.Namespace, line: str) -> None:
    if args.show_traceback or getattr(args, "verbose", False):
        traceback.print_exc()
    print(f"vllm-mw: {line}", file=sys.stderr)


def _no_worker(args: argparse.Namespace) -> int:
    print(
        "vllm-mw: worker: needs the worker extra: pip install 'vllm-middleware[worker]'",
        file=sys.stderr,
    )
    return _EXIT_USAGE


def _no_demo(args: argparse.Namespace) -> int:
    print("vllm-mw: demo: the vllm_middleware_testing package is missing", file=sys.stderr)
    return _EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
