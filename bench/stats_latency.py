"""`get_statistics()` latency against a private local Redis holding realistic statistics.

The stats hash is filled the way workers fill it (per-date and per-host counters: 30 dates x
50 hosts) and the stream has a consumer group with entries, so `XINFO GROUPS` has work to do.
Measured: the client's `get_statistics()` (sync, reused connection), `aget_statistics()`, and
the module-level `get_statistics(url)` ops helper, which opens a new connection per call.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import Any

import redis
from _common import banner, base_parser, make_record, median, pct, print_table
from vllm_middleware import VLLMMiddleware
from vllm_middleware import get_statistics as ops_get_statistics
from vllm_middleware.storage import StreamKeys
from vllm_middleware_testing import RedisServerProcess

STREAM = "bench:stats"


def prepare(url: str) -> None:
    client = redis.Redis.from_url(url)
    keys = StreamKeys(STREAM)
    fields: dict[str, int | str] = {"requests": 1_500_000, "errors": 1200, "bytes": 1 << 31,
                                    "files_count": 420, "size_bytes": 1 << 31, "log_dir": "/logs"}
    for day in range(30):
        fields[f"requests:date:2026-01-{day + 1:02d}"] = 50_000
    for host in range(50):
        fields[f"requests:host:app-{host}"] = 30_000
    client.hset(keys.stats, mapping=fields)
    record = make_record(1024)
    pipe = client.pipeline(transaction=False)
    for _ in range(5000):
        pipe.xadd(STREAM, {b"date": b"2026-01-01", b"host": b"app-1", b"err": b"0",
                           b"rec": record})
    pipe.execute()
    client.xgroup_create(STREAM, keys.group, id="0")
    client.xreadgroup(keys.group, "c1", {STREAM: ">"}, count=1000)  # some pending entries
    client.close()


def sample(fn: Any, count: int) -> list[float]:
    fn()
    out = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    banner("stats_latency", args)
    count = 300 if args.quick else 3000
    with RedisServerProcess() as server:
        prepare(server.url)
        mw = VLLMMiddleware(redis_url=server.url, stream=STREAM, log_dir=tempfile.mkdtemp())
        stats = mw.get_statistics()
        assert stats["total_requests"] == 1_500_000, stats
        runs = {
            "VLLMMiddleware.get_statistics()": sample(mw.get_statistics, count),
            "get_statistics(url) (new connection each call)": sample(
                lambda: ops_get_statistics(server.url, stream=STREAM), count // 3),
        }
        loop = asyncio.new_event_loop()
        runs["await VLLMMiddleware.aget_statistics()"] = sample(
            lambda: loop.run_until_complete(mw.aget_statistics()), count)
        loop.run_until_complete(mw.close())
        loop.close()
    rows = [[name, len(v), median(v), pct(v, 99), max(v),
             "yes" if median(v) < 2 else "NO"] for name, v in runs.items()]
    print_table("get_statistics() latency, ms (target: median < 2 ms)",
                ["call", "calls", "median ms", "p99 ms", "max ms", "median < 2 ms"], rows)


if __name__ == "__main__":
    main()
