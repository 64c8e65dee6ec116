"""Export: `vllm-mw export` (each format) vs an `iter_logs` pass over the same tree, same run.

The tree (`date=*/host=*/*.jsonl`, 2 dates x 2 hosts, ~1 KB chat records with usage and
parameters) is written with `PartitionWriter` (fsync off), then read with a warm page cache.
Passes are interleaved and repeated; the table shows the median records/s of each (wall clock,
and per CPU second of this process, which a busy machine disturbs less) and its ratio to
`iter_logs` (the target: >= 50%), and the peak RSS of each export pass (sampled every 5 ms by a
thread). Output goes to a file in the same temporary directory.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from datetime import date, timedelta
from pathlib import Path

from _common import banner, base_parser, make_record, median, print_table, rss_mb, timed
from vllm_middleware import iter_logs
from vllm_middleware._export import ExportOptions, export
from vllm_middleware._partition import PartitionWriter
from vllm_middleware._record_view import RecordFilter
from vllm_middleware.storage import RecordEntry

MB = 1024 * 1024
HOSTS = ("app-1", "app-2")
FORMATS = ("openai-chat", "sharegpt", "otlp-json")


def generate(root: Path, size_mb: int) -> int:
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
        self.value = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.value = max(self.value, rss_mb())

    def __enter__(self) -> Peak:
        self.value = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    banner("export_speed", args)
    size_mb = args.size_mb or (32 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="vllm-mw-bench-export-"))
    try:
        root = work / "logs"
        records = generate(root, size_mb)
        print(f"  tree: {records:,} records, {size_mb} MB")
        times: dict[str, list[float]] = {"iter_logs": [], **{f: [] for f in FORMATS}}
        cpus: dict[str, list[float]] = {"iter_logs": [], **{f: [] for f in FORMATS}}
        peaks: dict[str, float] = {}
        for _ in range(repeats):
            wall, cpu, count = timed(lambda: sum(1 for _ in iter_logs(root)))
            assert count == records
            times["iter_logs"].append(wall)
            cpus["iter_logs"].append(cpu)
            for fmt in FORMATS:
                out = work / f"out-{fmt}"
                with Peak() as peak:
                    wall, cpu, result = timed(
                        lambda fmt=fmt, out=out: export(
                            root,
                            out,
                            fmt,
                            # As the command line does: errors out of fine-tuning sets.
                            RecordFilter(exclude_errors=fmt != "otlp-json"),
                            ExportOptions(media="drop"),
                        )
                    )
                assert result.written == records, (fmt, result.written, result.skipped)
                times[fmt].append(wall)
                cpus[fmt].append(cpu)
                peaks[fmt] = max(peaks.get(fmt, 0.0), peak.value)
        base = records / median(times["iter_logs"])
        base_cpu = records / median(cpus["iter_logs"])
        rows = [["iter_logs (every record)", f"{base:,.0f}", "100%", f"{base_cpu:,.0f}", "100%",
                 "-"]]
        for fmt in FORMATS:
            rate = records / median(times[fmt])
            rate_cpu = records / median(cpus[fmt])
            rows.append([f"export {fmt}", f"{rate:,.0f}", f"{rate / base:.0%}",
                         f"{rate_cpu:,.0f}", f"{rate_cpu / base_cpu:.0%}", peaks[fmt]])
        print_table(
            f"export vs iter_logs ({records:,} records, median of {repeats})",
            ["pass", "records/s", "vs iter_logs", "records/CPU-s", "vs iter_logs (CPU)",
             "peak RSS MB"],
            rows,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
