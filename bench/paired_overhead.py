"""Client overhead in short paired blocks: the added CPU per request with a confidence interval.

`client_overhead.py` builds a fresh client per run and compares medians of 5-7 runs of ~1 s:
on this shared VM the spread of those runs (tens of µs per request) is larger than the
differences the targets are about (≤ 15-20 µs). Here every client is built and warmed once,
then the clients take turns in short blocks (`--block` requests; the order rotates every
round), so the machine's drift hits every mode alike; each block's CPU is paired with the bare
block of its round, and the table gives the median of those paired differences with its
distribution-free 95% confidence interval (order statistics of the binomial), over `--rounds`
rounds.

Same requests, handlers and window as `client_overhead.py`: an `httpx.MockTransport` whose
handler yields once (JSON, or a stream of ~23 SSE events read to the end), and a block's
window covers its requests and the wait until every record has been shipped (Redis XADD done,
or handed to the writer process). CPU is `time.process_time()` of this process (all its
threads), split into the app's thread (`time.thread_time()`, where the requests and their
records are made) and the others (the shipping thread); the context switches of all its
threads come from `getrusage` (its user/system split is counted in scheduler ticks, too coarse
for blocks this short, so it is not shown). The writer
process of the embedded mode runs on the other core; its CPU is not in the figure (as
Redis's is not), see `client_overhead.py` for it.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import banner, base_parser, median, print_table, quiet_gc, sample_messages
from client_overhead import (
    bare_call,
    drive,
    middleware,
    middleware_call,
    mock_handler,
    sse_handler,
    wait_shipped,
)
from vllm_middleware import VLLMMiddleware
from vllm_middleware_testing import RedisServerProcess

MODES = ("bare", "nolog", "redis", "embedded")
BASE_URL = "http://mock.invalid/v1"


def median_ci(values: list[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median: order statistics k and n-1-k, with k the
    largest index whose binomial tail stays within 2.5%."""
    ordered = sorted(values)
    n = len(ordered)
    tail, k = 0.0, 0
    for i in range(n):
        tail += math.comb(n, i) / 2**n
        if tail > 0.025:
            break
        k = i
    return ordered[k], ordered[n - 1 - k]


class Client:
    """One mode's client and its call, built once."""

    def __init__(self, mode: str, stream: bool, redis_url: str, log_dir: Path) -> None:
        handler = sse_handler if stream else mock_handler
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.http = httpx.AsyncClient(
            base_url=BASE_URL, transport=httpx.MockTransport(handler), limits=limits
        )
        self.mw: VLLMMiddleware | None = None
        messages = sample_messages()
        if mode == "bare":
            self.call = bare_call(self.http, messages, stream)
        else:
            self.mw = middleware(mode, BASE_URL, self.http, redis_url, log_dir)
            self.call = middleware_call(self.mw, messages, stream)

    async def block(self, requests: int, concurrency: int) -> tuple[float, float, float]:
        """(CPU µs, of which the app's thread's, context switches) per request of one block."""
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, own0 = time.process_time(), time.thread_time()
        await drive(self.call, requests, concurrency)
        if self.mw is not None:
            await wait_shipped(self.mw)
        cpu, own = time.process_time() - cpu0, time.thread_time() - own0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        switches = usage.ru_nvcsw + usage.ru_nivcsw - usage0.ru_nvcsw - usage0.ru_nivcsw
        return cpu / requests * 1e6, own / requests * 1e6, switches / requests

    async def aclose(self) -> None:
        if self.mw is not None:
            assert self.mw._sink is None or self.mw._sink.counters.dropped == 0
            await self.mw.close()
        await self.http.aclose()


async def plan(
    stream: bool, concurrency: int, args: Any, redis_url: str, log_root: Path
) -> list[list[Any]]:
    clients = {
        mode: Client(mode, stream, redis_url, Path(tempfile.mkdtemp(dir=log_root)))
        for mode in MODES
    }
    try:
        for client in clients.values():  # connections, the writer's first file, caches
            await client.block(args.block, min(concurrency, 8))
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        own: dict[str, list[float]] = {mode: [] for mode in MODES}
        switches: dict[str, list[float]] = {mode: [] for mode in MODES}
        with quiet_gc():
            for turn in range(args.rounds):
                order = MODES[turn % len(MODES) :] + MODES[: turn % len(MODES)]
                for mode in order:
                    c, o, s = await clients[mode].block(args.block, concurrency)
                    cpu[mode].append(c)
                    own[mode].append(o)
                    switches[mode].append(s)
    finally:
        for client in clients.values():
            await client.aclose()
    rows = []
    for mode in MODES:
        added = [m - b for m, b in zip(cpu[mode], cpu["bare"], strict=True)]
        low, high = median_ci(added)
        added_own = [m - b for m, b in zip(own[mode], own["bare"], strict=True)]
        rows.append([
            "stream" if stream else "json", concurrency, mode, median(cpu[mode]),
            "" if mode == "bare" else f"{median(added):+.1f}",
            "" if mode == "bare" else f"{low:+.1f} .. {high:+.1f}",
            "" if mode == "bare" else f"{median(added_own):+.1f}",
            f"{median(c - o for c, o in zip(cpu[mode], own[mode], strict=True)):.1f}",
            f"{median(switches[mode]):.2f}",
        ])  # fmt: skip
    return rows


async def main_async(args: Any, redis_url: str, log_root: Path) -> None:
    rows: list[list[Any]] = []
    for kind in args.replies:
        for concurrency in args.concurrencies:
            rows += await plan(kind == "stream", concurrency, args, redis_url, log_root)
            print(f"  done: {kind} c={concurrency}", flush=True)
    print_table(
        f"Client CPU per request, {args.rounds} rounds of {args.block}-request blocks "
        "(medians; added = paired with the bare block of the same round)",
        ["reply", "conc", "client", "CPU µs/req", "added µs/req", "95% CI of added",
         "added in the app's thread", "other threads µs/req", "context switches/req"],
        rows,
    )  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="blocks per mode")
    parser.add_argument("--block", type=int, default=200, help="requests per block")
    parser.add_argument("--replies", nargs="*", default=["json", "stream"])
    parser.add_argument("--concurrencies", nargs="*", type=int, default=[1, 32])
    args = parser.parse_args()
    args.rounds = args.rounds or (8 if args.quick else 40)
    banner("paired_overhead", args)
    os.environ["VLLM_MW_EMBEDDED_WRITER"] = "auto"
    log_root = Path(tempfile.mkdtemp(prefix="bench-paired-", dir=os.environ.get("BENCH_DIR")))
    try:
        with RedisServerProcess() as redis_server:
            asyncio.run(main_async(args, redis_server.url, log_root))
    finally:
        shutil.rmtree(log_root, ignore_errors=True)


if __name__ == "__main__":
    main()
