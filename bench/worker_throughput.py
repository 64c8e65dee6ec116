"""Worker throughput: drain a pre-filled stream with one and two `StreamConsumer` processes.

The stream is filled with entries in the exact format `RedisStreamSink` writes (the field names
of `vllm_middleware._keys`), records of ~1 KB and ~10 KB spread over 4 hosts (4 partitions).
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
from vllm_middleware._keys import FIELD_DATE, FIELD_ERROR, FIELD_HOST, FIELD_RECORD
from vllm_middleware.testing import RedisServerProcess
from vllm_middleware_worker import StreamConsumer, WorkerConfig, open_consumer_redis

STREAM = "bench:logs"
HOSTS = ("app-1", "app-2", "app-3", "app-4")
MB = 1024 * 1024


def fill(client: redis.Redis, records: list[bytes], total: int) -> int:
    """XADD `total` entries cycling over `records`; returns the payload bytes added."""
    date = today().encode()
    nbytes = 0
    pipe = client.pipeline(transaction=False)
    for i in range(total):
        data = records[i % len(records)]
        nbytes += len(data)
        pipe.xadd(STREAM, {
            FIELD_DATE: date,
            FIELD_HOST: HOSTS[i % len(HOSTS)].encode(),
            FIELD_ERROR: b"0",
            FIELD_RECORD: data,
        })
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()
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
        print(f"  redis-py parser: {parser_name}; batch size {batch}; "
              f"fsync per batch; {len(HOSTS)} partitions; {repeats} repeats")
        for size, total in sizes:
            records = [make_record(size, i) for i in range(256)]
            rec_bytes = sum(len(r) for r in records) / len(records)
            results: dict[str, list[float]] = {}
            for rep in range(repeats):
                for workers in (1, 2):
                    client.delete(STREAM)
                    nbytes = fill(client, records, total)
                    if workers == 1:
                        secs = redis_ceiling(client, batch)
                        results.setdefault("redis", []).append(total / secs)
                    log_dir = root / f"logs-{size}-{rep}-{workers}"
                    secs, done, cpu, batches = run_consumers(server.url, log_dir, workers)
                    if done != total or client.xlen(STREAM) != 0:
                        checks.append(f"size {size} workers {workers}: {done}/{total} records")
                    written = sum(p.stat().st_size for p in log_dir.rglob("*.jsonl"))
                    if written != nbytes + total:
                        checks.append(f"size {size}: {written} B in files, want {nbytes + total}")
                    results.setdefault(f"w{workers}", []).append(total / secs)
                    results.setdefault(f"w{workers}cpu", []).append(cpu / total * 1e6)
                    results.setdefault(f"w{workers}batch", []).append(total / max(batches, 1))
                    shutil.rmtree(log_dir, ignore_errors=True)
                chunk = b"".join(r + b"\n" for r in records)
                chunk = (chunk * (batch // len(records) + 1))[: int(batch * (rec_bytes + 1))]
                secs = disk_ceiling(root, chunk, int(total * (rec_bytes + 1)))
                results.setdefault("disk", []).append(total / secs)
                print(f"  size {size}: rep {rep + 1}/{repeats} done", flush=True)
            mb = (rec_bytes + 1) / MB
            disk, ceiling = median(results["disk"]), median(results["redis"])
            for label, key in (("disk: write+fsync per batch", "disk"),
                               ("redis: XREADGROUP+XACK (redis-py+hiredis)", "redis"),
                               ("1 worker (StreamConsumer)", "w1"), ("2 workers", "w2")):
                value = median(results[key])
                cpu = median(results[key + "cpu"]) if key + "cpu" in results else float("nan")
                rows.append([f"{rec_bytes:,.0f} B", total, label, value, value * mb,
                             f"{value / disk * 100:.0f}%", f"{value / ceiling * 100:.0f}%", cpu,
                             " / ".join(f"{v:,.0f}" for v in results[key])])
    shutil.rmtree(root, ignore_errors=True)
    print_table(
        "Drain throughput (median over repeats) beside the ceilings",
        ["record", "N", "what", "records/s", "MB/s", "of disk", "of redis",
         "worker CPU µs/rec", "all runs (records/s)"],
        rows,
    )
    print("\nchecks: " + ("all records drained, file bytes match" if not checks else
                          "; ".join(checks)))
    one_k = [r for r in rows if r[2].startswith("1 worker") and r[0].startswith("1,")]
    if one_k:
        print(f"target one worker >= 120,000 records/s (1 KB): {one_k[0][3]:,.0f} -> "
              f"{'met' if one_k[0][3] >= 120_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
