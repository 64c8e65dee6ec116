"""End-to-end lag: records offered through the client's shipping path vs time until durable.

The producer (this process) hands encoded ~1 KB records carrying their hand-off time to a
the Redis shipper with the client's default shipping settings (`submit()`, no HTTP), at a fixed
offered rate. One `StreamConsumer` runs concurrently in another process with the default
config (fsync per batch); a subclass notes the time each batch's `_write_durably` returns (the
bytes are written and fsynced; the ack follows) and the lag of every record in it. Clocks:
`time.monotonic()` (CLOCK_MONOTONIC, shared by processes on one machine).
"""

from __future__ import annotations

import array
import asyncio
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from _common import banner, base_parser, make_record, median, pct, print_table, today
from vllm_middleware._partition import BatchPlan, PartitionLines
from vllm_middleware._sinks._destination import redis_shipper
from vllm_middleware._sinks._shipping import Shipper
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import StreamConsumer, WorkerConfig, open_consumer_redis

STREAM = "bench:e2e"
PREFIX = b'{"bench_sent":'


class TimedConsumer(StreamConsumer):
    """Notes (sent, durable) for every record once its batch is written and fsynced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = array.array("d")
        self.durable = array.array("d")

    async def _write_durably(self, plan: BatchPlan, lines: PartitionLines, field: str) -> None:
        await super()._write_durably(plan, lines, field)
        now = time.monotonic()
        for chunks in lines.chunks.values():
            for chunk in chunks:  # a bundle: records joined by newlines
                for data in chunk.split(b"\n"):
                    self.sent.append(float(data[len(PREFIX) : data.index(b",", len(PREFIX))]))
                    self.durable.append(now)


def consumer_process(redis_url: str, log_dir: str, out: str, ready: Any, stop: MpEvent) -> None:
    config = WorkerConfig(redis_url=redis_url, log_dir=log_dir, stream=STREAM, consumer="bench-e2e")

    async def run() -> None:
        client = open_consumer_redis(config)
        consumer = TimedConsumer(client, config)
        task = asyncio.create_task(consumer.run())
        ready.put(1)
        while not stop.is_set():  # noqa: ASYNC110 - a multiprocessing event
            await asyncio.sleep(0.05)
        consumer.stop()
        await task
        await client.aclose()
        with open(out, "wb") as handle:
            orjson_bytes = orjson.dumps(
                {"sent": list(consumer.sent), "durable": list(consumer.durable)}
            )
            handle.write(orjson_bytes)

    asyncio.run(run())


async def offer(sink: Shipper, template: bytes, rate: int, seconds: float) -> float:
    """Submit `rate` records/s for `seconds`; returns the rate actually offered."""
    date = today()
    tail = template[template.index(b",") :]
    start = time.monotonic()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        now = time.monotonic()
        due = min(total, int((now - start) * rate) + 1)
        stamp = b"%s%.6f" % (PREFIX, now)
        while sent < due:
            sink.submit(RecordEntry(date, "bench-e2e", False, stamp + tail))
            sent += 1
        await asyncio.sleep(0.001)
    return total / (time.monotonic() - start)


async def producer(
    redis_url: str, rates: list[int], seconds: float
) -> list[tuple[int, float, float, float, int]]:
    client = aioredis.Redis.from_url(redis_url)
    sink = redis_shipper(client, keys=StreamKeys(STREAM))
    template = make_record(1024, 0, sent=0.0)
    phases = []
    for rate in rates:
        t0 = time.monotonic()
        dropped0 = sink.counters.dropped
        offered = await offer(sink, template, rate, seconds)
        t1 = time.monotonic()
        while sink.buffered:  # noqa: ASYNC110 - let the producer buffer empty before the next rate
            await asyncio.sleep(0.01)
        phases.append((rate, offered, t0, t1, sink.counters.dropped - dropped0))
        await asyncio.sleep(0.5)
    await sink.aclose()
    await client.aclose()
    return phases


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rates", default=None, help="comma-separated offered rates")
    args = parser.parse_args()
    banner("e2e_lag", args)
    seconds = 2.0 if args.quick else 5.0
    default = "5000,20000,40000" if args.quick else "2000,5000,10000,20000,30000,40000,50000"
    rates = [int(r) for r in (args.rates or default).split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=os.environ.get("BENCH_DIR")))
    out = root / "lags.json"
    rows: list[list[Any]] = []
    with RedisServerProcess() as server:
        ctx = mp.get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        proc = ctx.Process(
            target=consumer_process, args=(server.url, str(root / "logs"), str(out), ready, stop)
        )
        proc.start()
        ready.get(timeout=60)
        time.sleep(0.5)
        try:
            phases = asyncio.run(producer(server.url, rates, seconds))
            time.sleep(2.0)  # let the worker finish the backlog
        finally:
            stop.set()
            proc.join(timeout=120)
    data = orjson.loads(out.read_bytes())
    pairs = list(zip(data["sent"], data["durable"], strict=True))
    for rate, offered, t0, t1, dropped in phases:
        lags = [(d - s) * 1000 for s, d in pairs if t0 <= s <= t1]
        durable = [d for s, d in pairs if t0 <= s <= t1]
        span = (max(durable) - t0) if durable else float("nan")
        rows.append(
            [
                rate,
                offered,
                dropped,
                len(lags),
                len(lags) / span,
                median(lags),
                pct(lags, 99),
                max(lags) if lags else float("nan"),
                "yes"
                if rate == 20_000 and pct(lags, 99) < 250
                else ("NO" if rate == 20_000 else ""),
            ]
        )
    shutil.rmtree(root, ignore_errors=True)
    print_table(
        f"Hand-off to durable (written + fsynced) lag, {seconds:.0f} s per rate, ~1 KB records",
        [
            "target rate/s",
            "offered/s",
            "dropped (buffer full)",
            "records",
            "durable/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99 < 250 ms at 20k",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
