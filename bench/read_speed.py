"""Reading: `iter_logs` / `load_logs` over a partition tree vs orjson's raw parse of the same bytes.

The tree (`date=*/host=*/*.jsonl`, 4 dates x 4 hosts, ~1 KB records, 64 MB files) is written
with `PartitionWriter` (fsync off: generation is not measured), then read with a warm page cache.
Passes are interleaved and repeated: raw (read each file, split lines, `orjson.loads` each),
`iter_logs` (every record), and `load_logs` (a list of all records of a sub-range, since a list
of parsed records takes several times the bytes in memory). `iter_logs`' memory is the RSS
sampled every 5 ms by a thread, and at 25/50/75/100% of the records.

Then one file holding a single very long line (`--long-line-mb`, 200 MB by default) between two
short ones, read with `iter_logs` without a line cap: time and peak RSS growth, and the same
with the default `max_line_bytes` (the line skipped and counted). Run this script once on the
code before a change and once after (PYTHONPATH), in the same session, to compare.
"""

from __future__ import annotations

import gc
import inspect
import os
import shutil
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
from _common import banner, base_parser, make_record, median, print_table, rss_mb
from vllm_middleware import iter_logs, load_logs
from vllm_middleware._partition import PartitionWriter
from vllm_middleware._reader import iter_log_files
from vllm_middleware.storage import RecordEntry

MB = 1024 * 1024
HOSTS = ("app-1", "app-2", "app-3", "app-4")


def generate(root: Path, size_mb: int) -> tuple[int, int, list[str]]:
    """Write ~size_mb of records; returns (records, bytes, dates)."""
    writer = PartitionWriter(root, "gen", max_bytes=64 * MB, fsync=False)
    days = [(date(2026, 1, 1) + timedelta(days=i)).isoformat() for i in range(4)]
    pool = [make_record(1024 + (i % 7) * 40, i) for i in range(512)]
    target = size_mb * MB
    written = records = 0
    per_part = target // (len(days) * len(HOSTS))
    for day in days:
        for host in HOSTS:
            part = 0
            while part < per_part:
                batch = [RecordEntry(day, host, False, pool[(records + i) % len(pool)])
                         for i in range(1000)]
                result = writer.write_batch(batch)
                part += result.nbytes
                written += result.nbytes
                records += result.records
    writer.close()
    return records, written, days


class Sampler:
    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> Sampler:
        self.peak = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def raw_pass(root: Path) -> int:
    count = 0
    loads = orjson.loads
    for path in iter_log_files(root):
        with open(path, "rb") as handle:
            data = handle.read()
        for line in data.split(b"\n"):
            if line:
                loads(line)
                count += 1
    return count


def iter_pass(root: Path, total: int) -> tuple[int, list[float]]:
    marks = {total * q // 4 for q in (1, 2, 3, 4)}
    rss: list[float] = []
    count = 0
    for _ in iter_logs(root):
        count += 1
        if count in marks:
            rss.append(rss_mb())
    return count, rss


def long_line(size_mb: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-long-", dir=os.environ.get("BENCH_DIR")))
    try:
        path = root / "date=2026-01-01" / "host=a" / "w.jsonl"
        path.parent.mkdir(parents=True)
        with path.open("wb") as handle:
            handle.write(make_record(1000, 0) + b"\n")
            handle.write(b'{"request_id":"long","pad":"' + b"z" * (size_mb * MB) + b'"}\n')
            handle.write(make_record(1000, 1) + b"\n")
        with path.open("rb") as handle:  # warm the page cache
            while handle.read(64 * MB):
                pass
        capped = "max_line_bytes" in inspect.signature(iter_logs).parameters
        kinds = [("no cap", {"max_line_bytes": None})] if capped else [("(no cap option)", {})]
        if capped:
            kinds.append(("default cap (skipped)", {}))
        rows = []
        for name, kwargs in kinds:
            gc.collect()
            before = rss_mb()
            with Sampler() as sampler:
                start = time.perf_counter()
                count = sum(1 for _ in iter_logs(root, **kwargs))
                elapsed = time.perf_counter() - start
            rows.append([name, count, elapsed, sampler.peak - before])
        print_table(f"One {size_mb} MB line between two 1 KB records (iter_logs)",
                    ["reader", "records", "seconds", "peak RSS growth MiB"], rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=None)
    parser.add_argument("--load-mb", type=int, default=None,
                        help="size of the date range load_logs reads (default size/4)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--long-line-mb", type=int, default=None,
                        help="size of the long line (default 200, --quick 50; 0: skip)")
    args = parser.parse_args()
    banner("read_speed", args)
    size_mb = args.size_mb or (64 if args.quick else 1024)
    repeats = args.repeats or (2 if args.quick else 3)
    root = Path(tempfile.mkdtemp(prefix="bench-read-", dir=os.environ.get("BENCH_DIR")))
    try:
        t0 = time.perf_counter()
        records, nbytes, days = generate(root, size_mb)
        files = sum(1 for _ in iter_log_files(root))
        print(f"  generated {records:,} records, {nbytes / MB:,.0f} MB in {files} files "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        raw_pass(root)  # warm the page cache
        load_day = days[0]  # one date of four: size/4
        load_bytes = sum(p.stat().st_size for p in iter_log_files(root, start_date=load_day,
                                                                   end_date=load_day))
        speeds: dict[str, list[float]] = {"raw": [], "iter": [], "load": []}
        peaks: list[float] = []
        base_rss: list[float] = []
        marks: list[list[float]] = []
        load_rss: list[float] = []
        for _ in range(repeats):
            gc.collect()
            start = time.perf_counter()
            count = raw_pass(root)
            speeds["raw"].append(nbytes / MB / (time.perf_counter() - start))
            assert count == records
            gc.collect()
            base_rss.append(rss_mb())
            with Sampler() as sampler:
                start = time.perf_counter()
                count, rss = iter_pass(root, records)
                speeds["iter"].append(nbytes / MB / (time.perf_counter() - start))
            assert count == records
            peaks.append(sampler.peak)
            marks.append(rss)
            gc.collect()
            before = rss_mb()
            start = time.perf_counter()
            loaded = load_logs(root, load_day, load_day)
            speeds["load"].append(load_bytes / MB / (time.perf_counter() - start))
            load_rss.append(rss_mb() - before)
            del loaded
        raw = median(speeds["raw"])
        rows: list[list[Any]] = [
            ["orjson raw parse (read + split + loads)", nbytes / MB, median(speeds["raw"]),
             "100%", ", ".join(f"{v:.0f}" for v in speeds["raw"])],
            ["iter_logs (all records)", nbytes / MB, median(speeds["iter"]),
             f"{median(speeds['iter']) / raw * 100:.0f}%",
             ", ".join(f"{v:.0f}" for v in speeds["iter"])],
            [f"load_logs (one date: {load_day})", load_bytes / MB, median(speeds["load"]),
             f"{median(speeds['load']) / raw * 100:.0f}%",
             ", ".join(f"{v:.0f}" for v in speeds["load"])],
        ]
        print_table(f"Read speed, warm page cache ({repeats} repeats, median)",
                    ["reader", "MB read", "MB/s", "of orjson", "all runs MB/s"], rows)
        mem_rows = [[i + 1, base_rss[i], *marks[i], peaks[i], peaks[i] - base_rss[i]]
                    for i in range(repeats)]
        print_table("iter_logs memory: RSS (MiB) before, at 25/50/75/100% of records, peak",
                    ["run", "before", "25%", "50%", "75%", "100%", "peak (5 ms sampling)",
                     "peak - before"], mem_rows)
        print(f"\nload_logs of {load_bytes / MB:.0f} MB: RSS grew {median(load_rss):,.0f} MiB "
              f"({median(load_rss) / (load_bytes / MB):.1f}x the bytes)")
        ratio = median(speeds["iter"]) / raw * 100
        print(f"target iter_logs >= 70% of orjson: {ratio:.0f}% -> "
              f"{'met' if ratio >= 70 else 'NOT met'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    long_mb = args.long_line_mb if args.long_line_mb is not None else (50 if args.quick else 200)
    if long_mb:
        long_line(long_mb)


if __name__ == "__main__":
    main()
