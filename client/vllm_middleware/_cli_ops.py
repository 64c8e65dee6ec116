"""The operator's subcommands of `vllm-mw`: `health`, `dead-letters`, `spool`,
`retention`, `compress`, `compact`.

Kept apart from `_cli.py`, which only calls `add_ops_commands`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._health import EXIT_CODES, Thresholds, check_health

__all__ = ["add_ops_commands", "redis_url_from"]

_DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url_from(args: argparse.Namespace) -> str:
    return str(args.redis_url or os.environ.get("VLLM_MW_REDIS_URL") or _DEFAULT_REDIS_URL)


def add_ops_commands(commands: Any) -> None:
    """Add the operations subcommands to the `vllm-mw` subparsers."""
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
    add_dead_letter_commands(commands)
    add_spool_commands(commands)
    add_retention_command(commands)
    add_compress_command(commands)
    add_compact_command(commands)


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


# -- dead letters -------------------------------------------------------------------------------
def add_dead_letter_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "dead-letters", help="list, show, replay or purge dead-lettered stream entries"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="the oldest dead letters (one line each)")
    listing.add_argument("--count", type=int, default=100)
    listing.add_argument("--after", default="-", help="start after this dead-letter id")
    show = sub.add_parser("show", help="one dead letter with its records")
    show.add_argument("id")
    replay = sub.add_parser("replay", help="put dead letters back on the stream (after a fix)")
    replay.add_argument("ids", nargs="*")
    replay.add_argument("--all", action="store_true")
    purge = sub.add_parser("purge", help="delete dead letters")
    purge.add_argument("ids", nargs="*")
    purge.add_argument("--all", action="store_true")
    log = sub.add_parser("log", help="what was replayed or purged, newest first")
    log.add_argument("--count", type=int, default=100)
    for each in (listing, show, replay, purge, log):
        _add_redis_arguments(each)
        each.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_cmd_dead_letters)


def _cmd_dead_letters(args: argparse.Namespace) -> int:
    import redis

    from ._dead_letters import DeadLetters
    from ._health import redact_url
    from ._keys import StreamKeys

    url = redis_url_from(args)
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        letters = DeadLetters(client, StreamKeys(args.stream))
        return _dead_letter_action(args, letters)
    except redis.RedisError as exc:
        print(f"vllm-mw dead-letters: {redact_url(url)}: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _dead_letter_action(args: argparse.Namespace, letters: Any) -> int:
    action = args.action
    if action == "list":
        rows = letters.page(args.count, args.after)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{letters.count()} dead letters")
        for row in rows:
            print(
                f"{row['id']}  {row['records']} records {row['bytes']} B"
                f"  date={row['date']} host={row['host']}  source={row['source_id']}"
                f"  {row['reason']}"
            )
        return 0
    if action == "show":
        shown = letters.show(args.id)
        if shown is None:
            print("null" if args.json else f"no dead letter {args.id}")
            return 1
        if args.json:
            print(json.dumps(shown, indent=2))
        else:
            for key, value in shown.items():
                if key != "records_text":
                    print(f"{key:<10} {value}")
            print("records:")
            for line in shown["records_text"]:
                print(f"  {line}")
        return 0
    if action == "log":
        rows = letters.history(args.count)
        print(json.dumps(rows, indent=2) if args.json else "\n".join(map(str, rows)))
        return 0
    if not args.ids and not args.all:
        print(f"vllm-mw dead-letters {action}: give ids or --all", file=sys.stderr)
        return 2
    ids = letters.all_ids() if args.all else args.ids
    results = letters.replay(ids) if action == "replay" else letters.purge(ids)
    missing = [i for i, new in results.items() if new is None]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for dead_id, new in results.items():
            if new is None:
                print(f"{dead_id}: no such dead letter")
            elif action == "replay":
                print(f"{dead_id}: replayed as {new}")
            else:
                print(f"{dead_id}: purged")
    return 1 if missing else 0


# -- spools -------------------------------------------------------------------------------------
def add_spool_commands(commands: Any) -> None:
    parser = commands.add_parser("spool", help="the client spools on this machine")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="every spool directory holding records")
    listing.add_argument("--json", action="store_true")
    drain = sub.add_parser("drain", help="replay spools to a Redis (stranded ones included)")
    drain.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        help="also move in the stranded segments of this spool directory (repeatable)",
    )
    drain.add_argument(
        "--all", action="store_true", help="every spool directory of this stream on the machine"
    )
    drain.add_argument("--timeout", type=float, default=300.0)
    drain.add_argument("--json", action="store_true")
    for each in (listing, drain):
        _add_redis_arguments(each)
        each.add_argument("--spool-dir", help="spool root (env VLLM_MW_SPOOL_DIR)")
    parser.set_defaults(handler=_cmd_spool)


def _cmd_spool(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ._sinks._spool_drain import drain_spools, spool_directory_for
    from ._sinks._spool_inventory import inventory

    if args.action == "list":
        spools = [s.as_dict() for s in inventory(args.spool_dir)]
        url = args.redis_url or os.environ.get("VLLM_MW_REDIS_URL")
        if url:
            mine = str(spool_directory_for(url, args.stream, args.spool_dir))
            for spool in spools:
                spool["this_redis"] = spool["path"] == mine
        if args.json:
            print(json.dumps(spools, indent=2))
        elif not spools:
            print("no spooled records")
        for spool in [] if args.json else spools:
            mark = "  <- this Redis" if spool.get("this_redis") else ""
            print(
                f"{spool['path']}: {spool['segments']} segments, {spool['bytes']} bytes, "
                f"{spool['stranded_segments']} stranded, oldest {spool['oldest_age_s']} s{mark}"
            )
        return 0
    result = drain_spools(
        redis_url_from(args),
        stream=args.stream,
        root=args.spool_dir,
        sources=args.sources,
        every=args.all,
        timeout=args.timeout,
    )
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(f"target spool {result.target}")
        print(
            f"moved {len(result.moved)} stranded segments in;"
            f" {len(result.held)} held by a live process"
        )
        print(
            f"replayed {result.replayed} records ({result.damaged_regions} damaged regions skipped)"
        )
        print(f"left {result.remaining_bytes} bytes")
        if result.error:
            print(f"vllm-mw spool drain: {result.error}", file=sys.stderr)
    return 2 if result.error else 0


# -- retention ----------------------------------------------------------------------------------
def add_retention_command(commands: Any) -> None:
    parser = commands.add_parser(
        "retention", help="delete date partitions older than --keep-days (UTC)"
    )
    parser.add_argument("--keep-days", type=int, required=True, help="1 keeps today and yesterday")
    parser.add_argument("--log-dir", help="log tree (env VLLM_MW_LOG_DIR, default ./logs/vllm)")
    parser.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        help="seconds every file of a partition must be unchanged (above the writers' idle close)",
    )
    parser.add_argument(
        "--media-grace-days",
        type=float,
        default=7.0,
        help="media no record references is deleted once this old (above the longest time a "
        "record can wait in a spool)",
    )
    parser.add_argument(
        "--keep-media", action="store_true", help="leave log_dir/media alone (no scan of the tree)"
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_cmd_retention)


def _cmd_retention(args: argparse.Namespace) -> int:
    from ._retention import apply_retention, plan_retention

    log_dir = args.log_dir or os.environ.get("VLLM_MW_LOG_DIR") or "./logs/vllm"
    plan = plan_retention(log_dir, args.keep_days, min_age_s=args.min_age)
    report: dict[str, Any] = {
        "log_dir": str(log_dir),
        "cutoff": plan.cutoff,
        "dry_run": args.dry_run,
        "partitions": [{"date": p.date, "files": p.files, "bytes": p.bytes} for p in plan.delete],
        "kept_recently_changed": [p.date for p in plan.recent],
    }
    errors: list[str] = []
    if not args.dry_run:
        result = apply_retention(plan)
        report.update(deleted=result.deleted, deleted_bytes=result.bytes, errors=result.errors)
        errors = result.errors
    media = None if args.keep_media else _retention_media(args, plan, report, errors)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(plan.delete)} partitions before {plan.cutoff} ({plan.bytes} bytes)")
        for part in report["partitions"]:
            print(f"  date={part['date']}: {part['files']} files, {part['bytes']} bytes")
        for day in report["kept_recently_changed"]:
            print(f"  date={day}: kept, changed within {args.min_age:g} s")
        if media is not None:
            print(
                f"{verb} {len(media.delete)} media files no record references "
                f"({media.bytes} bytes); {media.kept_recent} kept within the grace period"
            )
            if media.refused:
                print(f"  media kept: {media.refused}")
        for error in errors:
            print(f"vllm-mw retention: {error}", file=sys.stderr)
    return 1 if errors else 0


def _retention_media(
    args: argparse.Namespace, plan: Any, report: dict[str, Any], errors: list[str]
) -> Any:
    """Media retention after the partitions (planned as if they were gone, on a dry run)."""
    from ._media_gc import apply_media_gc, plan_media_gc

    gone = [p.date for p in plan.delete] if args.dry_run else []
    media = plan_media_gc(plan.log_dir, grace_s=args.media_grace_days * 86400, excluding_days=gone)
    entry: dict[str, Any] = {
        "files": len(media.delete),
        "bytes": media.bytes,
        "kept_recent": media.kept_recent,
        "referenced": media.referenced,
        "refused": media.refused,
    }
    if not args.dry_run:
        done = apply_media_gc(media)
        entry.update(deleted=done.deleted, deleted_bytes=done.bytes)
        errors.extend(done.errors)
    report["media"] = entry
    return media


# -- compression --------------------------------------------------------------------------------
def add_compress_command(commands: Any) -> None:
    parser = commands.add_parser(
        "compress", help="gzip closed log files in place (every reader reads .jsonl.gz)"
    )
    parser.add_argument("--date", help="only this day (YYYY-MM-DD); default: every day")
    parser.add_argument("--log-dir", help="log tree (env VLLM_MW_LOG_DIR, default ./logs/vllm)")
    parser.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        help="seconds a file must be unchanged (above the writers' idle close)",
    )
    parser.add_argument("--level", type=int, default=6, help="gzip level, 1 (fast) to 9")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_cmd_compress)


def _cmd_compress(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ._compress import compress_tree

    log_dir = args.log_dir or os.environ.get("VLLM_MW_LOG_DIR") or "./logs/vllm"
    result = compress_tree(log_dir, day=args.date, min_age_s=args.min_age, level=args.level)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(
            f"compressed {result.compressed} files: {result.bytes_before} -> "
            f"{result.bytes_after} bytes; {result.finished_pairs} interrupted compressions "
            f"finished; {result.skipped_recent} files changed within {args.min_age:g} s left"
        )
        for error in result.errors:
            print(f"vllm-mw compress: {error}", file=sys.stderr)
    return 1 if result.errors else 0


# -- compaction ---------------------------------------------------------------------------------
def add_compact_command(commands: Any) -> None:
    parser = commands.add_parser(
        "compact", help="turn closed days into Parquet (needs the [analytics] extra)"
    )
    parser.add_argument(
        "--date", help="only this day (YYYY-MM-DD); default: every day before today"
    )
    parser.add_argument("--log-dir", help="log tree (env VLLM_MW_LOG_DIR, default ./logs/vllm)")
    parser.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        help="seconds every file of a partition must be unchanged (above the writers' idle close)",
    )
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_cmd_compact)


def _cmd_compact(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ._compact import compact_tree

    log_dir = args.log_dir or os.environ.get("VLLM_MW_LOG_DIR") or "./logs/vllm"
    result = compact_tree(log_dir, day=args.date, min_age_s=args.min_age)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(
            f"compacted {len(result.compacted)} partitions: {result.records} records,"
            f" {result.source_files} files ({result.source_bytes} bytes) -> "
            f"{result.parquet_bytes} bytes of Parquet; {result.dropped_lines} damaged lines dropped"
        )
        for skipped in result.skipped:
            print(f"  skipped {skipped}")
        for error in result.errors:
            print(f"vllm-mw compact: {error}", file=sys.stderr)
    return 1 if result.errors else 0
