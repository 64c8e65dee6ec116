"""The `vllm-mw` subcommands that use the logs: tail, query, export, report, ui.

`_cli.main` calls `add_commands` once; every handler returns an exit code and raises only
`VLLMMiddlewareError`s, which `main` prints as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ._record_view import RecordFilter, parse_meta

__all__ = ["add_commands"]


def _log_dir(args: argparse.Namespace) -> Path:
    return Path(args.log_dir or os.environ.get("VLLM_MW_LOG_DIR") or "./logs/vllm")


def _add_log_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-dir", help="root of the log tree (env VLLM_MW_LOG_DIR)")


def _add_filters(parser: argparse.ArgumentParser, *, dates: bool = True) -> None:
    if dates:
        parser.add_argument("--since", help="first UTC date, YYYY-MM-DD (inclusive)")
        parser.add_argument("--until", help="last UTC date, YYYY-MM-DD (inclusive)")
    parser.add_argument("--host", help="only this host's partitions")
    parser.add_argument("--model", help="only this model")
    parser.add_argument(
        "--meta", action="append", metavar="KEY=VALUE", help="metadata key equals value"
    )


def _filter(args: argparse.Namespace, **extra: Any) -> RecordFilter:
    return RecordFilter(
        since=getattr(args, "since", None),
        until=getattr(args, "until", None),
        host=args.host,
        model=args.model,
        meta=parse_meta(args.meta),
        **extra,
    )


def _cmd_tail(args: argparse.Namespace) -> int:
    from ._tail import format_line, tail

    def render(record: Mapping[str, Any]) -> str:
        if args.json:
            return orjson.dumps(record).decode()
        return format_line(record, full=args.full)

    flt = _filter(args, errors_only=args.errors)
    return tail(
        _log_dir(args),
        flt,
        count=args.lines,
        follow=args.follow,
        interval=args.interval,
        out=sys.stdout,
        render=render,
    )


def _cmd_query(args: argparse.Namespace) -> int:
    from ._query import run_query, write_result

    sql = args.sql
    if sql == "-":
        sql = sys.stdin.read()
    result = run_query(_log_dir(args), sql)
    write_result(result, sys.stdout, args.format, max_rows=args.max_rows)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ._export import ExportOptions, export

    fine_tuning = args.format != "otlp-json"
    flt = _filter(
        args,
        exclude_errors=fine_tuning and not args.include_errors,
        finish_reason=args.finish_reason,
    )
    options = ExportOptions(
        media=args.media,
        dedupe=args.dedupe,
        otlp_content=args.otlp_content,
        service_name=args.service_name,
        server_address=args.server_address,
    )
    result = export(
        _log_dir(args),
        args.out,
        args.format,
        flt,
        options,
        progress=True,
        otlp_endpoint=args.otlp_endpoint,
    )
    summary = {
        "format": args.format,
        "out": args.out,
        "written": result.written,
        "records_read": result.read.records,
        "skipped": dict(result.skipped),
        "bad_lines": result.read.bad_lines,
        "torn_tails": result.read.torn_tails,
        "media_missing": result.read.media_missing,
    }
    target = args.out or args.otlp_endpoint
    summary["out"] = target
    if args.json and args.out != "-":
        print(orjson.dumps(summary).decode())
    else:
        unit = "spans" if not fine_tuning else "examples"
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items())) or "none"
        print(
            f"wrote {result.written} {unit} to {target} from {result.read.records} records "
            f"(skipped: {skipped})",
            file=sys.stderr,
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ._report import ReportOptions, build_report, load_prices

    options = ReportOptions(
        since=args.since,
        until=args.until,
        by=args.by,
        prices=load_prices(args.prices) if args.prices else None,
    )
    document = build_report(_log_dir(args), options)
    out = Path(args.out)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(document, encoding="utf-8")
    os.replace(partial, out)
    print(f"wrote {out} ({len(document):,} bytes)", file=sys.stderr)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from ._ui import serve

    return serve(_log_dir(args), args.listen, allow_remote=args.allow_remote)


def add_commands(commands: Any) -> None:
    """Register tail, query and export on `vllm-mw`'s subparsers."""
    tail = commands.add_parser("tail", help="the latest records, one line each (-f: follow)")
    _add_log_dir(tail)
    _add_filters(tail, dates=False)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    tail.add_argument("-n", "--lines", type=int, default=20, help="records shown first (20)")
    tail.add_argument("--errors", action="store_true", help="only failed calls")
    tail.add_argument("--full", action="store_true", help="whole prompt and answer")
    tail.add_argument("--json", action="store_true", help="the records as JSON lines")
    tail.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    tail.set_defaults(handler=_cmd_tail)

    query = commands.add_parser(
        "query", help="SQL over the logs with DuckDB (view `logs`; needs the [analytics] extra)"
    )
    _add_log_dir(query)
    query.add_argument("sql", help='the SQL, e.g. "SELECT model, count(*) FROM logs GROUP BY 1"')
    query.add_argument("--format", choices=("table", "csv", "json", "jsonl"), default="table")
    query.add_argument("--json", dest="format", action="store_const", const="json")
    query.add_argument(
        "--max-rows", type=int, default=1000, help="rows a table shows (csv/json: all)"
    )
    query.set_defaults(handler=_cmd_query)

    export = commands.add_parser(
        "export", help="fine-tuning sets (OpenAI chat/completions, ShareGPT) or OTLP/JSON spans"
    )
    _add_log_dir(export)
    export.add_argument(
        "--format",
        required=True,
        choices=("openai-chat", "openai-completions", "sharegpt", "otlp-json"),
    )
    export.add_argument("--out", help="output file ('-': stdout)")
    export.add_argument(
        "--otlp-endpoint",
        help="otlp-json: send the spans to this OTLP/HTTP URL, e.g. "
        "http://localhost:4318/v1/traces (needs the [otlp] extra)",
    )
    _add_filters(export)
    export.add_argument("--finish-reason", help="only records with this finish reason (stop...)")
    export.add_argument(
        "--include-errors", action="store_true", help="fine-tuning: keep failed calls too"
    )
    export.add_argument(
        "--dedupe", action="store_true", help="one example per distinct conversation"
    )
    export.add_argument(
        "--media",
        choices=("keep", "drop"),
        default="keep",
        help="images and audio: restored from the media store (keep) or left out (drop)",
    )
    export.add_argument(
        "--otlp-content", action="store_true", help="otlp-json: include message contents"
    )
    export.add_argument("--service-name", default="vllm-middleware", help="otlp: service.name")
    export.add_argument("--server-address", help="otlp: the model server, HOST[:PORT]")
    export.add_argument("--json", action="store_true", help="print the summary as JSON")
    export.set_defaults(handler=_cmd_export)

    report = commands.add_parser(
        "report", help="one self-contained HTML report (needs the [analytics] extra)"
    )
    _add_log_dir(report)
    report.add_argument("--since", help="first UTC date, YYYY-MM-DD (inclusive)")
    report.add_argument("--until", help="last UTC date, YYYY-MM-DD (inclusive)")
    report.add_argument("--by", default="model", help="model, host, endpoint or meta.KEY")
    report.add_argument("--prices", help='TOML: [models."NAME"] input = $/M, output = $/M')
    report.add_argument("--out", default="report.html", help="the HTML file (report.html)")
    report.set_defaults(handler=_cmd_report)

    ui = commands.add_parser("ui", help="a local read-only web viewer (needs the [ui] extra)")
    _add_log_dir(ui)
    ui.add_argument("--listen", default="127.0.0.1:8089", help="HOST:PORT (127.0.0.1:8089)")
    ui.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --listen address"
    )
    ui.set_defaults(handler=_cmd_ui)
