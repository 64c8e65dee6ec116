"""Worker throughput: drain a pre-filled stream with one and two `StreamConsumer` processes.

The stream is filled by `RedisStreamSink`'s own script and packing, in flushes of 500 records
(its default batch) from 4 hosts (4 partitions), records of ~1 KB and ~10 KB. Two shapes:
bundles as a busy client ships them (up to 100 records / 64 KiB per entry) and one record per
entry (many lightly loaded clients, each flushing a record at a time).
Each consumer runs in its own process with the default durability (fsync per batch) and
`run(burst=True)`; the clock runs from a common start signal to the last consumer's return.

Ceilings measured in the same run, on the same entries / same directory:
- Redis: XREADGROUP COUNT <batch> + XACK with redis-py + hiredis (sync client), one process.
- disk: sequential `os.write` of batch-sized chunks with `os.fsync` after each, same bytes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import redis
from _common import banner, base_parser, make_record, median, print_table, today
from vllm_middleware._keys import BUNDLE_RECORDS
from vllm_middleware._sinks._redis_sink import _SHIP_BATCH, pack_batch
from vllm_middleware.storage import RecordEntry
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import StreamConsumer, WorkerConfig, open_consumer_redis

STREAM = "bench:logs"
HOSTS = ("app-1", "app-2", "app-3", "app-4")
MB = 1024 * 1024


def fill(client: redis.Redis, records: list[bytes], total: int, bundle_records: int) -> int:
    """Ship `total` records cycling over `records` as the client does; returns payload bytes."""
    date = today()
    script = client.register_script(_SHIP_BATCH)
    nbytes = 0
    flush = 500
    for first in range(0, total, flush):
        batch = []
        for i in range(first, min(total, first + flush)):
            data = records[i % len(records)]
            nbytes += len(data)
            batch.append(RecordEntry(date, HOSTS[(i // flush) % len(HOSTS)], False, data))
        args = pack_batch(batch, 0, 0, bundle_records=bundle_records)
        script(keys=[STREAM, f"bench:marker:{first}", "bench:stats"], args=args)
    return nbytes


def redis_ceiling(client: redis.Redis, batch: int) -> float:
    """Seconds to XREADGROUP+XACK the whole stream in a scratch group."""
    client.xgroup_create(STREAM, "ceiling", id="0")
    start = time.perf_counter()
    while True:
        reply = client.xreadgroup("ceiling", "c1", {STREAM: ">"}, count=batch)
        if not reply or not reply[0][1]:
            break
        client.xack(STREAM, "ceiling", *[entry_id for entry_id, _ in reply[0][1]])
    elapsed = time.perf_counter() - start
    client.xgroup_destroy(STREAM, "ceiling")
    return elapsed


def disk_ceiling(directory: Path, chunk: bytes, total_bytes: int) -> float:
    """Seconds to append `total_bytes` in `chunk`-sized writes, fsync after each."""
    path = directory / "disk-ceiling.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    written = 0
    start = time.perf_counter()
    try:
        while written < total_bytes:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            written += len(chunk)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def consumer_process(
    redis_url: str, log_dir: str, name: str, ready: Any, go: MpEvent, results: Any
) -> None:
    config = WorkerConfig(redis_url=redis_url, log_dir=log_dir, stream=STREAM, consumer=name)

    async def run() -> None:
        client = open_consumer_redis(config)
        await client.ping()
        consumer = StreamConsumer(client, config)
        ready.put(name)
        while not go.wait(0.001):  # noqa: ASYNC110 - a multiprocessing event
            await asyncio.sleep(0)
        cpu0, start = time.process_time(), time.monotonic()
        await consumer.run(burst=True)
        end = time.monotonic()
        results.put((name, start, end, consumer.status.records, time.process_time() - cpu0,
                     consumer.status.batches))
        await client.aclose()

    asyncio.run(run())


def run_consumers(redis_url: str, log_dir: Path, count: int) -> tuple[float, int, float, int]:
    """(seconds, records, CPU seconds of all consumers, batches) for `count` consumer processes."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=consumer_process,
                    args=(redis_url, str(log_dir), f"bench-w{i}", ready, go, results))
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)
    go.set()
    outs = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    start = min(o[1] for o in outs)
    end = max(o[2] for o in outs)
    return end - start, sum(o[3] for o in outs), sum(o[4] for o in outs), sum(o[5] for o in outs)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SHAPES = (("bundles", BUNDLE_RECORDS), ("1 per entry", 1))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    banner("worker_throughput", args)
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = [(1024, 40_000 if args.quick else 300_000),
             (10 * 1024, 5_000 if args.quick else 40_000)]
    batch = WorkerConfig().batch_size
    root = Path(tempfile.mkdtemp(prefix="bench-worker-", dir=os.environ.get("BENCH_DIR")))
    rows: list[list[Any]] = []
    checks: list[str] = []
    with RedisServerProcess() as server:
        client = redis.Redis.from_url(server.url)
        conn = client.connection_pool.get_connection()
        parser_name = type(conn._parser).__name__
        client.connection_pool.release(conn)
        redis_pid = int(client.info("server")["process_id"])
        print(f"  redis-py parser: {parser_name}; batch size {batch} records; "
              f"fsync per batch; {len(HOSTS)} partitions; {repeats} repeats")
        for size, total in sizes:
            records = [make_record(size, i) for i in range(256)]
            rec_bytes = sum(len(r) for r in records) / len(records)
            results: dict[str, list[float]] = {}
            for rep in range(repeats):
                for shape, per_entry in SHAPES:
                    for workers in (1, 2):
                        client.delete(STREAM)
                        nbytes = fill(client, records, total, per_entry)
                        entries = client.xlen(STREAM)
                        if workers == 1:
                            secs = redis_ceiling(client, batch)
                            results.setdefault(f"{shape}redis", []).append(total / secs)
                        log_dir = root / f"logs-{size}-{rep}-{workers}"
                        redis0 = proc_cpu(redis_pid)
                        secs, done, cpu, _batches = run_consumers(server.url, log_dir, workers)
                        redis_cpu = proc_cpu(redis_pid) - redis0
                        if done != total or client.xlen(STREAM) != 0:
                            checks.append(f"size {size} {shape} workers {workers}: "
                                          f"{done}/{total} records")
                        written = sum(p.stat().st_size for p in log_dir.rglob("*.jsonl"))
                        if written != nbytes + total:
                            checks.append(f"size {size} {shape}: {written} B in files, "
                                          f"want {nbytes + total}")
                        key = f"{shape}w{workers}"
                        results.setdefault(key, []).append(total / secs)
                        results.setdefault(key + "cpu", []).append(cpu / total * 1e6)
                        results.setdefault(key + "rcpu", []).append(redis_cpu / total * 1e6)
                        results.setdefault(shape + "per", []).append(total / entries)
                        shutil.rmtree(log_dir, ignore_errors=True)
                chunk = b"".join(r + b"\n" for r in records)
                chunk = (chunk * (batch // len(records) + 1))[: int(batch * (rec_bytes + 1))]
                secs = disk_ceiling(root, chunk, int(total * (rec_bytes + 1)))
                results.setdefault("disk", []).append(total / secs)
                print(f"  size {size}: rep {rep + 1}/{repeats} done", flush=True)
            mb = (rec_bytes + 1) / MB
            disk = median(results["disk"])
            plans = [("-", "disk: write+fsync per batch", "disk")]
            for shape, _ in SHAPES:
                plans += [(shape, "redis: XREADGROUP+XACK (redis-py+hiredis)", shape + "redis"),
                          (shape, "1 worker (StreamConsumer)", shape + "w1"),
                          (shape, "2 workers", shape + "w2")]
            for shape, label, key in plans:
                value = median(results[key])
                ceiling = median(results[shape + "redis"]) if shape != "-" else value
                per = f"{median(results[shape + 'per']):.1f}" if shape != "-" else "-"
                cpu = median(results[key + "cpu"]) if key + "cpu" in results else float("nan")
                rcpu = median(results[key + "rcpu"]) if key + "rcpu" in results else float("nan")
                rows.append([f"{rec_bytes:,.0f} B", total, per, label, value, value * mb,
                             f"{value / disk * 100:.0f}%",
                             f"{value / ceiling * 100:.0f}%" if shape != "-" else "-",
                             cpu, rcpu, " / ".join(f"{v:,.0f}" for v in results[key])])
    shutil.rmtree(root, ignore_errors=True)
    print_table(
        "Drain throughput (median over repeats) beside the ceilings",
        ["record", "N", "records/entry", "what", "records/s", "MB/s", "of disk", "of redis",
         "worker CPU µs/rec", "redis CPU µs/rec", "all runs (records/s)"],
        rows,
    )
    print("\nchecks: " + ("all records drained, file bytes match" if not checks else
                          "; ".join(checks)))
    for row in rows:
        if row[3].startswith("1 worker") and row[0].startswith("1,"):
            print(f"target one worker >= 120,000 records/s (1 KB, {row[2]} records/entry): "
                  f"{row[4]:,.0f} -> {'met' if row[4] >= 120_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
