"""Compaction: a grouped query over the JSONL tree vs the same tree after `vllm-mw compact`.

Generates `--records` records (default 10 million) over `--days` days and `--hosts` hosts,
written by `PartitionWriter` as `--writers` workers would (files rotated at `--file-mb`), then
times with DuckDB, in the same run and on the same records:

    SELECT date, model, quantile_cont(latency_ms, 0.99), count(*) ... GROUP BY date, model

over `read_json` of the JSONL tree (given the two columns' types, so DuckDB parses only what
it needs: the best case for JSON), then compacts the tree (`compact_tree`, timed) and runs the
same query over `read_parquet`. Both answers must be equal. Median of `--repeats` runs each.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import orjson
from _common import banner, base_parser, print_table
from vllm_middleware._compact import compact_tree
from vllm_middleware.storage import PartitionWriter, RecordEntry

QUERY = (
    "SELECT date, model, round(quantile_cont(latency_ms, 0.99), 3) AS p99, count(*) AS n "
    "FROM {source} GROUP BY date, model ORDER BY date, model"
)
MODELS = ("llama-3-8b", "qwen-2.5-omni-7b", "mistral-7b", "gemma-2-9b", "phi-3-mini")


def generate(root: Path, records: int, days: int, hosts: int, writers: int, file_mb: int) -> None:
    start = date(2026, 1, 1)
    pad = "x" * 400  # ~600-byte records: a short chat
    owners = [
        PartitionWriter(root, f"worker-{w}", fsync=False, max_bytes=file_mb * 1024 * 1024)
        for w in range(writers)
    ]
    batch: dict[int, list[RecordEntry]] = {w: [] for w in range(writers)}
    for i in range(records):
        day = (start + timedelta(days=i % days)).isoformat()
        data = orjson.dumps(
            {
                "timestamp": f"{day}T12:00:00.{i % 1_000_000:06d}+00:00",
                "request_id": f"req_{i}",
                "model": MODELS[i % len(MODELS)],
                "messages": [{"role": "user", "content": pad}],
                "latency_ms": (i * 7919) % 5000 / 3.0,
                "error": None,
                "status_code": 200,
                "usage": {"prompt_tokens": 40, "completion_tokens": i % 300},
            }
        )
        w = i % writers
        batch[w].append(RecordEntry(day, f"app-{i % hosts}", False, data))
        if len(batch[w]) >= 5000:
            owners[w].write_batch(batch[w])
            batch[w] = []
    for w, entries in batch.items():
        if entries:
            owners[w].write_batch(entries)
    for writer in owners:
        writer.close()


def tree_size(root: Path, suffix: str) -> tuple[int, int]:
    files = [p for p in root.rglob(f"*{suffix}") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run_query(source: str, repeats: int) -> tuple[float, list[tuple[object, ...]]]:
    times = []
    rows: list[tuple[object, ...]] = []
    for _ in range(repeats):
        con = duckdb.connect()
        started = time.perf_counter()
        rows = con.execute(QUERY.format(source=source)).fetchall()
        times.append(time.perf_counter() - started)
        con.close()
    return statistics.median(times), rows


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--file-mb", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to build the trees (default: a temp dir)")
    args = parser.parse_args()
    records = args.records or (200_000 if args.quick else 10_000_000)
    banner("compact_query", args)
    base = Path(tempfile.mkdtemp(prefix="vllm-mw-compact-", dir=args.dir))
    root = base / "logs"
    try:
        started = time.perf_counter()
        generate(root, records, args.days, args.hosts, args.writers, args.file_mb)
        print(f"  generated {records} records in {time.perf_counter() - started:.1f} s", flush=True)
        json_files, json_bytes = tree_size(root, ".jsonl")
        source = (
            f"read_json('{root}/date=*/host=*/*.jsonl', format='newline_delimited',"
            " hive_partitioning=true, columns={'model': 'VARCHAR', 'latency_ms': 'DOUBLE'})"
        )
        json_s, json_rows = run_query(source, args.repeats)
        print(f"  JSONL query: {json_s:.2f} s", flush=True)
        old = time.time() - 7200  # the files are closed: let compaction take them
        for path in root.rglob("*"):
            os.utime(path, (old, old))
        started = time.perf_counter()
        result = compact_tree(root, min_age_s=3600)
        compact_s = time.perf_counter() - started
        assert result.errors == [] and result.records == records, result
        pq_files, pq_bytes = tree_size(root, ".parquet")
        source = f"read_parquet('{root}/date=*/host=*/*.parquet', hive_partitioning=true)"
        pq_s, pq_rows = run_query(source, args.repeats)
        assert pq_rows == json_rows, "the two trees answered differently"
        mb = 1024 * 1024
        json_row = ["JSONL (read_json, 2 typed columns)", json_files, json_bytes / mb]
        json_row += [f"{json_s:.3f}", "1.0"]
        pq_row = ["Parquet (after vllm-mw compact)", pq_files, pq_bytes / mb]
        pq_row += [f"{pq_s:.3f}", f"{json_s / pq_s:.1f}"]
        print_table(
            f"p99 latency by model and day over {records:,} records (median of {args.repeats})",
            ["tree", "files", "MB", "query s", "speed-up"],
            [json_row, pq_row],
        )
        print(
            f"\ncompaction: {compact_s:.1f} s for {result.source_files} files "
            f"({result.source_bytes / mb:.0f} MB) -> {pq_bytes / mb:.0f} MB "
            f"({records / compact_s:,.0f} records/s)"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
