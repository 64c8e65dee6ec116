"""Instructions per record (callgrind) of `vllm-mw export` per format vs an `iter_logs` pass
over the same fixed tree: a figure that does not move with the machine's load.

    python bench/callgrind_export.py [--baseline REV] [--after REV] [--records 2500]

The tree is deterministic (fixed timestamps about 50 records a second, request and response
ids, token counts that vary from record to record, ~1 KB chat records as in
`export_speed.py`; a second tree of `/completions` records for `openai-completions`). Each
(code, pass) runs twice under `valgrind --tool=callgrind` in a fresh interpreter, over a tree of
N and of N/5 records; the difference divided by the difference in records cancels start-up and
imports. The ratio column is what the issue's target reads as "speed": instructions per record
of `iter_logs` over those of the export (>= 50% wanted).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

SCRIPT = Path(__file__).resolve()
FORMATS = ("openai-chat", "openai-completions", "sharegpt", "otlp-json")


def _record(i: int, completions: bool) -> dict[str, Any]:
    from _common import make_record

    record: dict[str, Any] = orjson.loads(make_record(1024 + (i % 7) * 40, i))
    second, micro = divmod(i * 20_011, 1_000_000)  # ~50 records a second
    record["timestamp"] = (
        f"2026-01-01T10:{second // 60 % 60:02d}:{second % 60:02d}.{micro:06d}+00:00"
    )
    record["request_id"] = f"req_20260101_100000_cg_{i}"
    record["response"]["id"] = f"chatcmpl-{i}"
    usage = {"prompt_tokens": 20 + i % 300, "completion_tokens": 5 + i % 200}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    record["usage"] = record["response"]["usage"] = usage
    record["latency_ms"] = 100 + i % 900 + 0.25
    if completions:
        record["prompt"] = record.pop("messages")[0]["content"]
        record["endpoint"] = "completions"
        record["response"]["object"] = "text_completion"
        record["response"]["choices"] = [{"index": 0, "text": "Echo: ok", "finish_reason": "stop"}]
    return record


def generate(root: Path, records: int, completions: bool) -> None:
    files = [
        root / f"date=2026-01-0{d}" / f"host=app-{h}" / "w.jsonl" for d in (1, 2) for h in (1, 2)
    ]
    for path in files:
        path.parent.mkdir(parents=True)
    handles = [open(path, "wb") for path in files]  # noqa: SIM115
    try:
        for i in range(records):
            handles[i * len(handles) // records].write(
                orjson.dumps(_record(i, completions)) + b"\n"
            )
    finally:
        for handle in handles:
            handle.close()


def child(args: argparse.Namespace) -> None:
    from vllm_middleware import iter_logs
    from vllm_middleware._export import ExportOptions, export
    from vllm_middleware._record_view import RecordFilter

    root = Path(args.root)
    if args.mode == "iter_logs":
        count = sum(1 for _ in iter_logs(root))
    else:
        result = export(
            root,
            args.out,
            args.mode,
            RecordFilter(exclude_errors=args.mode != "otlp-json"),  # as the command line does
            ExportOptions(media="drop"),
        )
        count = result.written
    print(count)


def instructions(client_dir: Path | None, args: list[str], scratch: Path) -> int:
    from _common import callgrind_total

    out = scratch / f"callgrind.{len(list(scratch.iterdir()))}"
    return callgrind_total(SCRIPT, args, out, client_dir=client_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2500)
    parser.add_argument("--baseline", default="", help="git revision to compare with")
    parser.add_argument("--after", default="", help="git revision instead of this checkout")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--mode", default="")
    args = parser.parse_args()
    sys.path.insert(0, str(SCRIPT.parent))
    if args.child:
        child(args)
        return

    from _common import banner, print_table
    from _versions import baseline_client

    banner("callgrind_export", args)
    versions: list[tuple[str, Path | None]] = [
        (f"after ({args.after})", baseline_client(args.after))
        if args.after
        else ("after (this checkout)", None)
    ]
    if args.baseline:
        versions.insert(0, (f"before ({args.baseline})", baseline_client(args.baseline)))
    scratch = Path(tempfile.mkdtemp(prefix="bench-callgrind-export-"))
    sizes = (args.records // 5, args.records)
    try:
        for kind in ("chat", "completions"):
            for size in sizes:
                generate(scratch / f"{kind}-{size}", size, kind == "completions")
        rows: list[list[Any]] = []
        cache: dict[tuple[str, str, str], float] = {}

        def per_record(name: str, client_dir: Path | None, kind: str, mode: str) -> float:
            if (name, kind, mode) not in cache:
                counts = [
                    instructions(client_dir, ["--root", str(scratch / f"{kind}-{size}"),
                                              "--out", str(scratch / "out"), "--mode", mode],
                                 scratch)
                    for size in sizes
                ]  # fmt: skip
                cache[(name, kind, mode)] = (counts[1] - counts[0]) / (sizes[1] - sizes[0])
            return cache[(name, kind, mode)]

        for fmt in args.formats.split(","):
            kind = "completions" if fmt == "openai-completions" else "chat"
            for name, client_dir in versions:
                base = per_record(name, client_dir, kind, "iter_logs")
                cost = per_record(name, client_dir, kind, fmt)
                rows.append([fmt, name, f"{base:,.0f}", f"{cost:,.0f}", f"{base / cost:.0%}"])
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for _, client_dir in versions:
            if client_dir is not None:
                shutil.rmtree(client_dir.parent, ignore_errors=True)
    print_table(
        f"instructions per record (callgrind; trees of {sizes[0]:,} and {sizes[1]:,} records)",
        ["format", "code", "iter_logs Ir/record", "export Ir/record", "iter_logs / export"],
        rows,
    )


if __name__ == "__main__":
    main()
