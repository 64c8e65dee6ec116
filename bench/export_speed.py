"""Export: `vllm-mw export` (each format) vs an `iter_logs` pass over the same tree, same run.

The tree (`date=*/host=*/*.jsonl`, 2 dates x 2 hosts, ~1 KB chat records with usage and
parameters) is written with `PartitionWriter` (fsync off), then read with a warm page cache.
Each measurement is a fresh interpreter that reads the whole tree with `iter_logs` and then
exports it, so every export has its own `iter_logs` pass, taken moments before on the same
machine, to be compared with. With `--baseline REV` the same children run the client of that
git revision too ("before"), interleaved with this checkout's ("after").

The table shows the median records/s of each pass (wall clock, and per CPU second of the
child, which a busy machine disturbs less), the median of the per-child ratios to `iter_logs`
(the target: >= 50%), and the peak RSS of the export passes (sampled every 5 ms by a thread).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import threading
from collections import deque
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson

SCRIPT = Path(__file__).resolve()
MB = 1024 * 1024
HOSTS = ("app-1", "app-2")
FORMATS = ("openai-chat", "sharegpt", "otlp-json")


def generate(root: Path, size_mb: int) -> int:
    from _common import make_record
    from vllm_middleware.storage import PartitionWriter, RecordEntry

    writer = PartitionWriter(root, "gen", max_bytes=64 * MB, fsync=False)
    days = [(date(2026, 1, 1) + timedelta(days=i)).isoformat() for i in range(2)]
    pool = [make_record(1024 + (i % 7) * 40, i) for i in range(512)]
    per_part = size_mb * MB // (len(days) * len(HOSTS))
    records = 0
    for day in days:
        for host in HOSTS:
            part = 0
            while part < per_part:
                batch = [
                    RecordEntry(day, host, False, pool[(records + i) % len(pool)])
                    for i in range(1000)
                ]
                result = writer.write_batch(batch)
                part += result.nbytes
                records += result.records
    writer.close()
    return records


class Peak:
    def __init__(self) -> None:
        from _common import rss_mb

        self._rss = rss_mb
        self.value = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.value = max(self.value, self._rss())

    def __enter__(self) -> Peak:
        self.value = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One `iter_logs` pass, then one export pass, in this interpreter."""
    from _common import timed
    from vllm_middleware import iter_logs
    from vllm_middleware._export import ExportOptions, export
    from vllm_middleware._record_view import RecordFilter

    root = Path(args.root)
    iter_wall, iter_cpu, count = timed(lambda: sum(1 for _ in iter_logs(root)))
    with Peak() as peak:
        wall, cpu, result = timed(
            lambda: export(
                root,
                args.out,
                args.format,
                # As the command line does: errors out of fine-tuning sets.
                RecordFilter(exclude_errors=args.format != "otlp-json"),
                ExportOptions(media="drop"),
            )
        )
    return {
        "records": count,
        "written": result.written,
        "iter_wall": iter_wall,
        "iter_cpu": iter_cpu,
        "wall": wall,
        "cpu": cpu,
        "peak": peak.value,
    }


def breakdown(root: Path, records: int) -> None:
    """Per-record CPU of each stage, on records already parsed (this checkout's code)."""
    import time

    from _common import print_table
    from vllm_middleware import iter_logs
    from vllm_middleware._export import _CONVERTERS, ExportOptions, ExportResult
    from vllm_middleware._otlp import _Clock, otlp_lines

    options = ExportOptions(media="drop")
    files = sorted(root.rglob("*.jsonl"))
    sample = [line for line in files[0].read_bytes().splitlines() if line.strip()][:20_000]
    parsed = [orjson.loads(line) for line in sample]

    def per_record(fn: Any, items: list[Any]) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            fn(items)
            best = min(best, time.process_time() - start)
        return best / len(items) * 1e6

    def read_all(_: Any) -> None:
        drain(iter_logs(root))

    def drain(items: Any) -> None:
        deque(items, maxlen=0)  # results dropped as made, as an export does

    chat, sharegpt = _CONVERTERS["openai-chat"], _CONVERTERS["sharegpt"]
    dumps, newline, sha256 = orjson.dumps, orjson.OPT_APPEND_NEWLINE, hashlib.sha256
    stages = [
        ("iter_logs, whole pass (files, split, parse, LogRecord)",
         per_record(read_all, [None] * records)),
        ("  of which orjson.loads of the line",
         per_record(lambda xs: drain(map(orjson.loads, xs)), sample)),
        ("otlp-json: spans and their documents (otlp_lines)",
         per_record(lambda xs: drain(otlp_lines(xs, options, ExportResult())), parsed)),
        ("  of which sha256 of the request id (trace/span ids)",
         per_record(lambda xs: drain(sha256(r["request_id"].encode()).hexdigest() for r in xs),
                    parsed)),
        ("  of which the timestamp as nanoseconds (_Clock.nanos)",
         per_record(lambda xs: drain(map(_Clock().nanos, [r["timestamp"] for r in xs])), parsed)),
        ("  of which orjson.dumps of request id, response id, parameters",
         per_record(lambda xs: drain(dumps((r["request_id"], r["response"]["id"], r["parameters"]))
                                     for r in xs), parsed)),
        ("openai-chat: convert + orjson.dumps",
         per_record(lambda xs: drain(dumps(chat(r, options), option=newline) for r in xs), parsed)),
        ("sharegpt: convert + orjson.dumps",
         per_record(lambda xs: drain(dumps(sharegpt(r, options), option=newline) for r in xs),
                    parsed)),
    ]  # fmt: skip
    print_table("per-record CPU by stage (µs, best of 5, this checkout)", ["stage", "µs/record"],
                [[name, f"{us:.2f}"] for name, us in stages])  # fmt: skip


def parent(args: argparse.Namespace) -> None:
    from _common import banner, median, print_table
    from _versions import baseline_client, run_child

    banner("export_speed", args)
    size_mb = args.size_mb or (32 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 3)
    versions: list[tuple[str, Path | None]] = [("after (this checkout)", None)]
    if args.baseline:
        versions.insert(0, (f"before ({args.baseline})", baseline_client(args.baseline)))
    work = Path(tempfile.mkdtemp(prefix="vllm-mw-bench-export-"))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        root = work / "logs"
        records = generate(root, size_mb)
        print(f"  tree: {records:,} records, {size_mb} MB", flush=True)
        if args.breakdown:
            breakdown(root, records)
        for _ in range(repeats):
            for fmt in FORMATS:
                for name, client_dir in versions:
                    out = work / f"out-{fmt}"
                    run = run_child(SCRIPT, client_dir, [
                        "--root", str(root), "--out", str(out), "--format", fmt,
                    ])  # fmt: skip
                    assert run["records"] == run["written"] == records, (fmt, name, run)
                    runs.setdefault((fmt, name), []).append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for _, client_dir in versions:
            if client_dir is not None:
                shutil.rmtree(client_dir.parent, ignore_errors=True)
    every = [run for group in runs.values() for run in group]
    base = records / median([r["iter_wall"] for r in every])
    base_cpu = records / median([r["iter_cpu"] for r in every])
    rows: list[list[Any]] = [
        ["iter_logs (every record; all children)", "-", f"{base:,.0f}", "100%",
         f"{base_cpu:,.0f}", "100%", "-"],
    ]  # fmt: skip
    for fmt in FORMATS:
        for name, _ in versions:
            group = runs[(fmt, name)]
            rate = records / median([r["wall"] for r in group])
            rate_cpu = records / median([r["cpu"] for r in group])
            ratio = median([r["iter_wall"] / r["wall"] for r in group])
            ratio_cpu = median([r["iter_cpu"] / r["cpu"] for r in group])
            rows.append([f"export {fmt}", name, f"{rate:,.0f}", f"{ratio:.0%}",
                         f"{rate_cpu:,.0f}", f"{ratio_cpu:.0%}",
                         max(r["peak"] for r in group)])  # fmt: skip
    print_table(
        f"export vs iter_logs ({records:,} records, {size_mb} MB, median of {repeats})",
        ["pass", "code", "records/s", "vs iter_logs", "records/CPU-s", "vs iter_logs (CPU)",
         "peak RSS MB"],
        rows,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--size-mb", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--baseline", default="", help="git revision to compare with")
    parser.add_argument("--breakdown", action="store_true", help="also time each stage")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--format", default="")
    args = parser.parse_args()
    sys.path.insert(0, str(SCRIPT.parent))
    if args.child:
        print(orjson.dumps(child(args)).decode())
        return
    parent(args)


if __name__ == "__main__":
    main()
