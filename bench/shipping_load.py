"""Shipping under load: do records leave memory while the app's event loop is busy?

Callers send chat requests through `VLLMMiddleware` over an `httpx.MockTransport` as fast as
they can for a fixed time, with one of two handlers: `plain` (a plain function: nothing in a
call ever suspends, so the app's loop never turns, like an in-process or cached upstream) and
`yield` (one `await asyncio.sleep(0)` per call, like real I/O). Concurrency 1, 64 and 512;
and `yield` at concurrency 1 once more with the interpreter's forced GIL switch out of play
(`forced_switch_off`: what a quiet machine does to the shipping thread, on a loaded one too).
Redis mode ships to a private redis-server drained by one `vllm-mw worker` process; embedded
mode writes the files through its writer process. Default settings (`max_buffer` 50,000).

Per run: the buffer's high-water mark (records in memory at once), records dropped, and the
time from `submit` to shipped (Redis script done / batch written and fsynced), p50 and p99,
over every record (the ones shipped by the final `aclose` included), after one untimed
warm-up call per run (the embedded writer process starts at the first flush, once per
process: not a cost of load). The `plain` handler is
kept as it is: making it yield would hide exactly what this measures.

Each case runs in a fresh interpreter, once with this checkout's client and once with the
client of `--baseline` (default `main`), interleaved, so both see the same machine.
Target: zero drops and p99 under 250 ms while the sink keeps up.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

SCRIPT = Path(__file__).resolve()
MODEL = "vllm:qwen-2.5-omni-7b"


# -- child: one run ------------------------------------------------------------------------------


async def child_run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from _common import sample_messages
    from vllm_middleware import VLLMMiddleware

    reply = orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
        }
    )

    def plain(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=reply, headers={"content-type": "application/json"})

    async def yielding(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)
        return plain(request)

    handler: Any = plain if args.handler == "plain" else yielding
    # base_url on the injected client too: the baseline needs it (issue 10 item 1)
    http = httpx.AsyncClient(base_url="http://up/v1", transport=httpx.MockTransport(handler))
    if args.mode == "redis":
        mw = VLLMMiddleware(base_url="http://up/v1", http_client=http, redis_url=args.redis_url)
    else:
        mw = VLLMMiddleware(
            base_url="http://up/v1", http_client=http, log_dir=args.log_dir, redis_url=""
        )
    sink = mw._sink
    assert sink is not None
    counters = sink.counters
    submitted: collections.deque[float] = collections.deque()
    latencies: list[float] = []
    high = 0
    clock = time.perf_counter
    submit, ship = sink.submit, sink.ship

    def timed_submit(entry: Any) -> None:
        nonlocal high
        before = counters.dropped
        submit(entry)
        if counters.dropped == before:
            submitted.append(clock())
        held = sink.buffered
        if held > high:
            high = held

    async def timed_ship(batch: Any, **counts: int) -> None:
        await ship(batch, **counts)
        now = clock()
        pop = submitted.popleft
        latencies.extend([now - pop() for _ in range(len(batch))])

    messages = sample_messages()
    # Warm-up, untimed and the same for both versions: the embedded writer process starts
    # at the first flush (~0.1 s, seconds on a loaded machine), once per process.
    await mw.chat_completion(messages, model=MODEL)
    while sink.buffered:  # noqa: ASYNC110 - polls the sink's state
        await asyncio.sleep(0.005)
    sink.submit = timed_submit  # type: ignore[method-assign]
    sink.ship = timed_ship  # type: ignore[method-assign]
    if args.no_forced_switch:
        gil_conditions(1000.0, "split")
    elif args.switch_interval or args.pin != "none":
        gil_conditions(args.switch_interval or sys.getswitchinterval(), args.pin)
    flushes = 0
    ship_timed = sink.ship

    async def counted_ship(batch: Any, **counts: int) -> None:
        nonlocal flushes
        flushes += 1
        await ship_timed(batch, **counts)

    sink.ship = counted_ship  # type: ignore[method-assign]
    wakeups_before = thread_wakeups()

    calls = 0
    end = time.monotonic() + args.seconds

    async def caller() -> None:
        nonlocal calls
        while time.monotonic() < end:
            await mw.chat_completion(messages, model=MODEL, temperature=0.2, max_tokens=256)
            calls += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(args.callers)))
    elapsed = time.perf_counter() - started
    wakeups = thread_wakeups() - wakeups_before
    ran = flushes
    handoff = getattr(sink, "_handoff", None)
    await mw.aclose(timeout=60)
    await http.aclose()
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1000

    return {
        "calls": calls,
        "rate": calls / elapsed,
        "high_water": high,
        "dropped": counters.dropped,
        "shipped": len(latencies),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "spooled": counters.spooled,
        "flushes_per_s": ran / elapsed,
        "wakeups_per_s": wakeups / elapsed,
        "handoffs": getattr(handoff, "lent", None),
    }


def thread_wakeups() -> int:
    """Voluntary context switches of the shipping thread so far: each is a sleep it was woken
    from (a timer, I/O, or a GIL release by another thread)."""
    import threading

    total = 0
    for thread in threading.enumerate():
        if thread.name.startswith("vllm-mw-") and "spool" not in thread.name and thread.native_id:
            with open(f"/proc/self/task/{thread.native_id}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    return total


def gil_conditions(interval: float, pin: str) -> None:
    """`--no-forced-switch` (1000 s, "split") is what a quiet machine does to the shipping
    thread behind a loop that keeps yielding, on any machine: the interpreter's forced switch
    never fires, and the app's thread and the sink's threads run on different CPUs (a thread
    woken on the GIL holder's CPU preempts it and wins the GIL: "same")."""
    import threading

    sys.setswitchinterval(interval)
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "none" or len(cpus) < 2:
        return
    os.sched_setaffinity(0, {cpus[0]})
    other = cpus[1] if pin == "split" else cpus[0]
    for thread in threading.enumerate():
        if thread.name.startswith("vllm-mw-") and thread.native_id is not None:
            os.sched_setaffinity(thread.native_id, {other})


# -- parent ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke run)")
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--seconds", type=float, help="seconds of calls per run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="embedded")
    parser.add_argument("--handler", default="plain")
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--log-dir", default="")
    parser.add_argument("--no-forced-switch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--switch-interval", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--pin", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--handlers", default="", help="only these handlers (plain,yield)")
    parser.add_argument(
        "--mechanism",
        action="store_true",
        help="only the GIL experiment: c=1 yielding callers, embedded, under switch intervals "
        "and CPU placements",
    )
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(SCRIPT.parent))
        print(orjson.dumps(asyncio.run(child_run(args))).decode())
        return
    if args.mechanism:
        mechanism(args)
        return
    parent(args)


def mechanism(args: argparse.Namespace) -> None:
    """How often the shipping thread runs behind one yielding caller, and what changes it."""
    sys.path.insert(0, str(SCRIPT.parent))
    from _common import banner, print_table
    from _versions import baseline_client, run_child

    banner("shipping_load --mechanism", args)
    seconds = args.seconds or 4.0
    baseline = baseline_client(args.baseline)
    scratch = Path(tempfile.mkdtemp(prefix="bench-gil-"))
    conditions = [
        ("5 ms (default)", "none"),
        ("100 µs", "none"),
        ("1000 s", "none"),
        ("1000 s", "same"),
        ("1000 s", "split"),
    ]
    intervals = {"5 ms (default)": 0.005, "100 µs": 0.0001, "1000 s": 1000.0}
    rows: list[list[Any]] = []
    for name, client_dir in [(f"before ({args.baseline})", baseline), ("after", None)]:
        for interval, pin in conditions:
            log_dir = tempfile.mkdtemp(dir=scratch)
            result = run_child(SCRIPT, client_dir, [
                "--mode", "embedded", "--handler", "yield", "--callers", "1",
                "--seconds", str(seconds), "--log-dir", log_dir,
                "--switch-interval", str(intervals[interval]), "--pin", pin,
            ])  # fmt: skip
            rows.append([
                name, interval, pin, result["rate"], result["flushes_per_s"],
                result["wakeups_per_s"], result["handoffs"] or "", result["high_water"],
                result["p99_ms"],
            ])  # fmt: skip
            print(f"  done: {name} {interval} {pin}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(baseline.parent, ignore_errors=True)
    print_table(
        f"One yielding caller, embedded, {seconds:g} s: the shipping thread's turns",
        ["client", "switch interval", "CPUs (app / shipping thread)", "calls/s", "flushes/s",
         "thread wake-ups/s", "handoffs", "buffer high-water", "p99 ms"],
        rows,
    )  # fmt: skip


def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from _common import banner, print_table
    from _versions import baseline_client, run_child
    from vllm_middleware_testing import RedisServerProcess

    banner("shipping_load", args)
    seconds = args.seconds or (1.5 if args.quick else 6.0)
    baseline = baseline_client(args.baseline)
    versions: list[tuple[str, Path | None]] = [
        (f"before ({args.baseline})", baseline),
        ("after (this checkout)", None),
    ]
    scratch = Path(tempfile.mkdtemp(prefix="bench-shipping-"))
    os.environ["VLLM_MW_SPOOL_DIR"] = str(scratch / "spool")  # never ~/.cache
    rows: list[list[Any]] = []
    with RedisServerProcess(tmp_dir=scratch) as server:
        worker_log = open(scratch / "worker.log", "ab")  # noqa: SIM115 - closed below
        worker = subprocess.Popen(
            [sys.executable, "-m", "vllm_middleware_worker", "--redis-url", server.url,
             "--log-dir", str(scratch / "worker-logs"), "--consumer", "bench"],
            stdout=worker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            cases = [(h, c, False) for h in ("plain", "yield") for c in (1, 64, 512)]
            cases.append(("yield", 1, True))  # a quiet machine's GIL race, on any machine
            if args.handlers:
                cases = [case for case in cases if case[0] in args.handlers.split(",")]
            for mode in ("redis", "embedded"):
                for handler, callers, no_switch in cases:
                    for name, client_dir in versions:
                        log_dir = tempfile.mkdtemp(dir=scratch)
                        extra = ["--no-forced-switch"] if no_switch else []
                        result = run_child(SCRIPT, client_dir, [
                            "--mode", mode, "--handler", handler, "--callers", str(callers),
                            "--seconds", str(seconds), "--redis-url", server.url,
                            "--log-dir", log_dir, *extra,
                        ])  # fmt: skip
                        shutil.rmtree(log_dir, ignore_errors=True)
                        met = result["dropped"] == 0 and result["p99_ms"] < 250
                        shown = f"{handler}, no forced switch" if no_switch else handler
                        rows.append([
                            mode, shown, callers, name, result["calls"],
                            result["rate"], result["high_water"], result["dropped"],
                            result["spooled"], result["p50_ms"], result["p99_ms"],
                            "yes" if met else "NO",
                        ])  # fmt: skip
                        print(f"  done: {mode} {shown} c={callers} {name}", flush=True)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            worker_log.close()
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(baseline.parent, ignore_errors=True)
    print_table(
        f"Shipping under load ({seconds:g} s of calls per run; target: 0 dropped, p99 < 250 ms)",
        ["mode", "handler", "callers", "client", "calls", "calls/s", "buffer high-water",
         "dropped", "spooled", "submit→shipped p50 ms", "p99 ms", "met"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
