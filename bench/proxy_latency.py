"""Latency the logging proxy adds: the same requests direct to the fake upstream and through
`vllm-mw proxy`, side by side in one run.

The fake vLLM server runs in a child process with a fixed server-side delay (`--delay`, before
the first byte of every reply), the proxy in another (`python -m vllm_middleware._cli proxy`),
once recording into an embedded log tree (the product) and once with `--no-record` (the
forwarding alone). One asyncio httpx client drives all three targets in interleaved rounds, so
a noisy machine shifts every column alike. For each case:

- JSON: a chat completion; added latency = p50/p99 through the proxy minus direct, c=1 and c=64.
- stream: the same chat streamed; time to first body byte (TTFT) and to the end.
- throughput: requests/s through the proxy at c=64 with no server delay, and the proxy's CPU
  per request (its process's CPU time over the window): 1e6 / (CPU µs per request) is the
  requests/s one core sustains.

With `--callgrind`, also the proxy's instructions per request (valgrind's callgrind, the
proxy process traced whole; (instructions of a run of N requests - those of a run of M) /
(N - M), so start-up cancels out), which do not depend on the machine's load: JSON and
streamed replies, recording off and on (the embedded writer process, not traced, does the file
writes); without `--quick`, also with uvicorn's h11 parser on asyncio's own loop.

Usage: .venv/bin/python bench/proxy_latency.py [--quick] [--delay S] [--rounds N] [--callgrind]
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import banner, base_parser, callgrind_summary, cpu_seconds, pct, print_table

MODEL = "bench-model"
BODY = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a concise assistant for an internal tool."},
        {"role": "user", "content": "Summarise the quarterly report in two sentences."},
    ],
    "max_tokens": 32,
}


class Child:
    """A child process whose first stdout/stderr line names its port."""

    def __init__(self, argv: list[str], pattern: str, stream: str) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stream == "stderr" else None,
            text=True,
        )
        pipe = self.proc.stdout if stream == "stdout" else self.proc.stderr
        assert pipe is not None
        seen = []
        while (line := pipe.readline()) and (found := re.search(pattern, line)) is None:
            seen.append(line)  # valgrind's banner, warnings
        if not line or found is None:
            self.proc.kill()
            raise RuntimeError(f"child did not start: {''.join(seen)!r}")
        self.port = int(found.group(1))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fake_upstream(delay: float) -> Child:
    code = (
        "import sys\n"
        "from vllm_middleware_testing import FakeVLLMServer\n"
        f"s = FakeVLLMServer(model={MODEL!r}, first_token_delay={delay!r}).start()\n"
        "print(s.port, flush=True)\n"
        "sys.stdin.read()\n"
    )
    return Child([sys.executable, "-c", code], r"(\d+)", "stdout")


def proxy(upstream: str, *extra: str, prefix: tuple[str, ...] = ()) -> Child:
    argv = [*prefix, sys.executable, "-m", "vllm_middleware._cli", "proxy", "--upstream", upstream]
    argv += ["--listen", "127.0.0.1:0", *extra]
    return Child(argv, r"127\.0\.0\.1:(\d+)/v1", "stderr")


Call = Callable[[httpx.AsyncClient, str], Awaitable[tuple[float, float]]]


async def json_call(client: httpx.AsyncClient, base: str) -> tuple[float, float]:
    started = time.perf_counter()
    response = await client.post(f"{base}/chat/completions", content=JSON_BODY, headers=JSON)
    response.raise_for_status()
    elapsed = time.perf_counter() - started
    return elapsed, elapsed


async def stream_call(client: httpx.AsyncClient, base: str) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    async with client.stream(
        "POST", f"{base}/chat/completions", content=STREAM_BODY, headers=JSON
    ) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            if not first and chunk:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


JSON = {"content-type": "application/json"}
JSON_BODY = orjson.dumps(BODY)
STREAM_BODY = orjson.dumps({**BODY, "stream": True})


async def run(
    client: httpx.AsyncClient, base: str, call: Call, total: int, concurrency: int
) -> tuple[list[float], list[float], float]:
    firsts: list[float] = []
    totals: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            first, whole = await call(client, base)
            firsts.append(first)
            totals.append(whole)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return firsts, totals, time.perf_counter() - started


async def latency_tables(targets: dict[str, str], rounds: int, per_round: dict[int, int]) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        for base in targets.values():  # warm connections and code paths
            await run(client, base, json_call, 50, 8)
            await run(client, base, stream_call, 50, 8)
        for name, call in (("JSON", json_call), ("stream", stream_call)):
            for concurrency, count in per_round.items():
                firsts: dict[str, list[float]] = {t: [] for t in targets}
                totals: dict[str, list[float]] = {t: [] for t in targets}
                # c=1: the targets take turns request by request (a load spike hits all
                # alike); c=64: round by round.
                turns, size = (rounds * count, 1) if concurrency == 1 else (rounds, count)
                for _ in range(turns):
                    for target, base in targets.items():
                        f, t, _ = await run(client, base, call, size, concurrency)
                        firsts[target] += f
                        totals[target] += t
                _print_latency(name, concurrency, firsts, totals)


def _ms(values: list[float], q: float) -> float:
    return pct(values, q) * 1000


def _print_latency(
    name: str, concurrency: int, firsts: dict[str, list[float]], totals: dict[str, list[float]]
) -> None:
    direct_total = totals["direct"]
    direct_first = firsts["direct"]
    rows = []
    for target in totals:
        row: list[object] = [
            target,
            len(totals[target]),
            _ms(totals[target], 50),
            _ms(totals[target], 99),
        ]
        if target == "direct":
            row += ["", ""]
        else:
            row += [
                _ms(totals[target], 50) - _ms(direct_total, 50),
                _ms(totals[target], 99) - _ms(direct_total, 99),
            ]
        if name == "stream":
            row.append(_ms(firsts[target], 50))
            row.append(
                "" if target == "direct" else _ms(firsts[target], 50) - _ms(direct_first, 50)
            )
        rows.append(row)
    header = ["target", "requests", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"]
    if name == "stream":
        header += ["TTFT p50 ms", "added TTFT p50 ms"]
    print_table(f"{name}, c={concurrency}", header, rows)


async def throughput_table(targets: dict[str, str], pids: dict[str, int], total: int) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    rows = []
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        for name, call in (("JSON", json_call), ("stream", stream_call)):
            for target, base in targets.items():
                await run(client, base, call, 200, 64)
                pid = pids.get(target)
                cpu_before = cpu_seconds(pid) if pid else 0.0
                _, _, elapsed = await run(client, base, call, total, 64)
                cpu_us = (cpu_seconds(pid) - cpu_before) / total * 1e6 if pid else float("nan")
                per_core = 1e6 / cpu_us if pid and cpu_us > 0 else float("nan")
                rows.append([name, target, total / elapsed, cpu_us, per_core])
    print_table(
        "throughput at c=64, no server delay (proxy CPU from /proc; one core = 1e6 / CPU µs)",
        ["reply", "target", "requests/s", "proxy CPU µs/request", "requests/s per proxy core"],
        rows,
    )


def _instructions(upstream: str, extra: list[str], body: bytes, requests: int, out: Path) -> int:
    prefix = ("valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={out}")
    child = proxy(upstream, *extra, prefix=prefix)
    base = f"http://127.0.0.1:{child.port}/v1"
    with httpx.Client(timeout=600) as client:
        for _ in range(requests):
            with client.stream("POST", f"{base}/chat/completions", content=body, headers=JSON) as r:
                r.read()
    child.proc.terminate()
    child.proc.wait(timeout=600)
    return callgrind_summary(out)


def callgrind_table(tmp: Path, quick: bool) -> None:
    upstream = fake_upstream(0.0)
    base = f"http://127.0.0.1:{upstream.port}/v1"
    few, many = (5, 25) if quick else (20, 120)
    fast = ("--http", "httptools", "--loop", "uvloop")
    variants = {
        "httptools + uvloop, no record": [*fast, "--no-record"],
        "httptools + uvloop, recording": [*fast, "--log-dir", str(tmp / "cg-logs")],
    }
    if not quick:
        variants["h11 + asyncio, no record"] = ["--http", "h11", "--loop", "asyncio", "--no-record"]
    rows = []
    try:
        for name, extra in variants.items():
            for kind, body in (("JSON", JSON_BODY), ("stream", STREAM_BODY)):
                args = [*extra, "--no-metrics"]
                low = _instructions(base, args, body, few, tmp / "cg.low")
                high = _instructions(base, args, body, many, tmp / "cg.high")
                rows.append([name, kind, (high - low) / (many - few) / 1000])
    finally:
        upstream.stop()
    print_table(
        "proxy instructions per request (callgrind; chat completion, JSON or streamed)",
        ["proxy", "reply", "k instructions / request"],
        rows,
    )


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--delay", type=float, default=0.02, help="server-side delay, seconds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callgrind", action="store_true", help="instructions per request too")
    parser.add_argument("--only-callgrind", action="store_true", help="just those")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    per_round = {1: 30, 64: 256} if args.quick else {1: 150, 64: 1024}
    total = 500 if args.quick else 3000
    banner("proxy_latency", args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.callgrind or args.only_callgrind:
            callgrind_table(Path(tmp), args.quick)
        if args.only_callgrind:
            return
        upstream = fake_upstream(args.delay)
        base = f"http://127.0.0.1:{upstream.port}/v1"
        plain = proxy(base, "--no-record", "--no-metrics")
        recorded = proxy(base, "--log-dir", str(Path(tmp) / "logs"))
        try:
            targets = {
                "direct": base,
                "proxy, no record": f"http://127.0.0.1:{plain.port}/v1",
                "proxy, recording": f"http://127.0.0.1:{recorded.port}/v1",
            }
            delay_ms = args.delay * 1000
            print(f"\n## Added latency (server delay {delay_ms:.0f} ms, {rounds} rounds)")
            asyncio.run(latency_tables(targets, rounds, per_round))
        finally:
            for child in (plain, recorded, upstream):
                child.stop()
        upstream = fake_upstream(0.0)
        base = f"http://127.0.0.1:{upstream.port}/v1"
        plain = proxy(base, "--no-record", "--no-metrics")
        recorded = proxy(base, "--log-dir", str(Path(tmp) / "logs2"))
        try:
            targets = {
                "direct": base,
                "proxy, no record": f"http://127.0.0.1:{plain.port}/v1",
                "proxy, recording": f"http://127.0.0.1:{recorded.port}/v1",
            }
            pids = {"proxy, no record": plain.proc.pid, "proxy, recording": recorded.proc.pid}
            asyncio.run(throughput_table(targets, pids, total))
        finally:
            for child in (plain, recorded, upstream):
                child.stop()


if __name__ == "__main__":
    main()
