"""Compression in place: cost, size, and what it does to reading the tree.

Generates `--records` records (default 1 million, about 1 KB each: chat text drawn from a
vocabulary of made-up words, ids and timestamps that differ per record, so that they compress
about as much as real traffic rather than as a repeated pad) with `PartitionWriter` (files
rotated at `--file-mb`), then, in the same run:

1. reads the plain tree: `iter_logs` (every record parsed) and a DuckDB grouped query
   (`vllm-mw query`'s `logs` view), median of `--repeats`;
2. compresses a copy at each `--levels` gzip level (`compress_tree`, timed: MB/s of input,
   ratio), and reads the compressed tree the same two ways;
3. times the media-retention scan (`plan_media_gc`: every record of the tree looked at) over the
   plain and the compressed tree.

Every read must return the same records (counted and compared).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from _common import banner, base_parser, print_table
from compact_query import MODELS
from vllm_middleware import iter_logs
from vllm_middleware._compress import compress_tree
from vllm_middleware._media_gc import plan_media_gc
from vllm_middleware._query import connect
from vllm_middleware.storage import PartitionWriter, RecordEntry

QUERY = (
    "SELECT date, model, round(quantile_cont(latency_ms, 0.99), 3), count(*) FROM logs "
    "GROUP BY ALL ORDER BY ALL"
)


def _vocabulary(rng: random.Random, words: int = 5000) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [13, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(words)]


def generate(root: Path, records: int, file_mb: int) -> None:
    rng = random.Random(7)
    vocabulary = _vocabulary(rng)
    writer = PartitionWriter(root, "worker-0", fsync=False, max_bytes=file_mb * 1024 * 1024)
    batch: list[RecordEntry] = []
    for i in range(records):
        day = f"2026-01-0{1 + i % 4}"
        question = " ".join(rng.choices(vocabulary, k=rng.randint(10, 60)))
        answer = " ".join(rng.choices(vocabulary, k=rng.randint(30, 120)))
        record = {
            "timestamp": f"{day}T{i % 24:02d}:{i % 60:02d}:{i % 59:02d}.{i % 999_999:06d}+00:00",
            "request_id": f"req_20260101_000000_{rng.getrandbits(64):016x}",
            "model": MODELS[i % len(MODELS)],
            "messages": [{"role": "user", "content": question}],
            "response": {"choices": [{"message": {"role": "assistant", "content": answer}}]},
            "latency_ms": round(rng.uniform(20, 5000), 3),
            "error": None,
            "status_code": 200,
            "usage": {"prompt_tokens": rng.randint(10, 90), "completion_tokens": i % 300},
        }
        batch.append(RecordEntry(day, f"app-{i % 2}", False, orjson.dumps(record)))
        if len(batch) >= 5000:
            writer.write_batch(batch)
            batch = []
    if batch:
        writer.write_batch(batch)
    writer.close()


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def reads(root: Path, repeats: int) -> tuple[float, float, float, Any, int]:
    count_s, count = median_time(lambda: sum(1 for _ in iter_logs(root)), repeats)
    query_s, rows = median_time(lambda: connect(root).execute(QUERY).fetchall(), repeats)
    media_s, plan = median_time(lambda: plan_media_gc(root), 1)
    assert plan.refused is None, plan.refused
    return count_s, query_s, media_s, rows, count


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--file-mb", type=int, default=16)
    parser.add_argument("--levels", default="1,6")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to build the trees (default: a temp dir)")
    args = parser.parse_args()
    records = args.records or (100_000 if args.quick else 1_000_000)
    banner("compress_tree", args)
    base = Path(tempfile.mkdtemp(prefix="vllm-mw-compress-", dir=args.dir))
    root = base / "plain"
    mb = 1024 * 1024
    try:
        generate(root, records, args.file_mb)
        (root / "media").mkdir()  # a media store, so that the scan runs
        old = time.time() - 7200
        for path in root.rglob("*"):
            os.utime(path, (old, old))
        plain_bytes = size(root)
        count_s, query_s, media_s, rows, count = reads(root, args.repeats)
        assert count == records
        table = [
            ["plain JSONL", "-", f"{plain_bytes / mb:.0f}", "1.00", "-"]
            + [f"{x:.2f}" for x in (count_s, query_s, media_s)]
        ]
        for level in (int(x) for x in args.levels.split(",")):
            copy = base / f"gz{level}"
            shutil.copytree(root, copy)
            for path in copy.rglob("*"):
                os.utime(path, (old, old))
            started = time.perf_counter()
            result = compress_tree(copy, level=level)
            took = time.perf_counter() - started
            assert result.errors == [] and result.bytes_after > 0, result
            gz_count_s, gz_query_s, gz_media_s, gz_rows, gz_count = reads(copy, args.repeats)
            assert gz_count == records and gz_rows == rows, "the compressed tree reads differently"
            table.append(
                [
                    f"gzip level {level}",
                    f"{took:.1f} s ({result.bytes_before / mb / took:.0f} MB/s)",
                    f"{size(copy) / mb:.0f}",
                    f"{result.bytes_before / result.bytes_after:.2f}",
                    str(result.compressed),
                    f"{gz_count_s:.2f}",
                    f"{gz_query_s:.2f}",
                    f"{gz_media_s:.2f}",
                ]
            )
            shutil.rmtree(copy)
        print_table(
            f"{records:,} records, files rotated at {args.file_mb} MB "
            f"(reads: median of {args.repeats}, seconds)",
            ["tree", "compress", "MB", "ratio", "files", "iter_logs", "DuckDB", "media scan"],
            table,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
