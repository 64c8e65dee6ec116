"""Client overhead: bare httpx vs VLLMMiddleware (Redis mode, embedded mode), same transport.

Each run sends the same chat requests through one of three clients, over either an
`httpx.MockTransport` (no network: isolates the client's own work) or real HTTP to a
`FakeVLLMServer` running in a separate process (so its CPU is not charged to the client).
The mock handlers yield to the event loop once per request, as real I/O does, so the
middleware's background flushing interleaves with the requests as it would in an app.
Runs are interleaved (bare, redis, embedded, bare, ...) and repeated; the window of each run
covers the requests and, for the middleware, waiting until every record has been shipped (Redis
XADD done / file written and fsynced), so background flushing is charged to the client.

Two reply kinds: a JSON reply (non-streaming), and a streamed reply (`stream=True`: an SSE
body of a role chunk, ~20 content chunks, a finish chunk, a usage chunk and `[DONE]`, sent as
one body chunk per event). The bare streaming client parses every event with orjson and keeps
the chunks, as an app would; the middleware also reassembles the reply for its record.

CPU is `time.process_time()` of this process (all threads: the embedded writer thread too).
Embedded mode runs twice: with its writer process (the default; that process's CPU in the
window, read from /proc, is shown in its own column, like Redis's CPU it runs on the other
core) and with the writer thread (`VLLM_MW_EMBEDDED_WRITER=thread`).
Throughput is requests / wall time of the request phase. "Added" is the median over
repetitions of the paired difference (middleware run minus the bare run of the same round).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from _common import banner, base_parser, median, print_table, quiet_gc, sample_messages
from vllm_middleware import VLLMMiddleware
from vllm_middleware_testing import RedisServerProcess

MODEL = "vllm:qwen-2.5-omni-7b"
# nolog: the wrapper with logging off; embedded-thread: the files written from a thread
MODES = ("bare", "nolog", "redis", "embedded", "embedded-thread")


async def mock_handler(request: httpx.Request) -> httpx.Response:
    # One turn of the event loop, as any real I/O gives: without it nothing else (the
    # middleware's flush task, the other requests at c=32) runs until the request phase ends.
    await asyncio.sleep(0)
    body = orjson.loads(request.content)
    text = body["messages"][-1]["content"]
    reply = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body.get("model", MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"Echo: {text}"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 48, "completion_tokens": 44, "total_tokens": 92},
    }
    return httpx.Response(
        200, content=orjson.dumps(reply), headers={"content-type": "application/json"}
    )


STREAM_CHUNKS = 20  # content chunks per streamed reply (plus role, finish and usage chunks)


async def sse_handler(request: httpx.Request) -> httpx.Response:
    """A vLLM-like SSE reply: role chunk, ~20 content chunks, finish, usage, [DONE].

    Sent as one chunk per event (an async byte stream), as a server's chunked body arrives.
    """
    await asyncio.sleep(0)  # as in `mock_handler`
    body = orjson.loads(request.content)
    words = f"Echo: {body['messages'][-1]['content']}".split()
    per = max(1, len(words) // STREAM_CHUNKS)
    pieces = [" ".join(words[i : i + per]) + " " for i in range(0, len(words), per)]
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": body.get("model", MODEL)}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    events += [{**base, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                     "finish_reason": None}]} for piece in pieces]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "choices": [],
                       "usage": {"prompt_tokens": 48, "completion_tokens": 44,
                                 "total_tokens": 92}})
    frames = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]

    async def chunks() -> Any:
        for frame in frames:
            yield frame

    return httpx.Response(
        200, content=chunks(), headers={"content-type": "text/event-stream"}
    )


@dataclass
class Result:
    cpu_us: list[float] = field(default_factory=list)
    writer_us: list[float] = field(default_factory=list)  # the embedded writer process's CPU
    rps: list[float] = field(default_factory=list)


class FakeServer:
    """FakeVLLMServer in a child process; its threads must not count as client CPU."""

    def __init__(self) -> None:
        code = (
            "import sys\n"
            "from vllm_middleware_testing import FakeVLLMServer\n"
            f"s = FakeVLLMServer(model={MODEL!r}).start()\n"
            "print(s.port, flush=True)\n"
            "sys.stdin.read()\n"
            "s.stop()\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def drive(call: Callable[[], Awaitable[Any]], total: int, concurrency: int) -> None:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def wait_shipped(mw: VLLMMiddleware) -> None:
    sink = mw._sink
    while sink is not None and sink.buffered:  # noqa: ASYNC110 - polls the sink's state
        await asyncio.sleep(0.002)


def bare_call(
    http: httpx.AsyncClient, messages: list[dict[str, str]], stream: bool
) -> Callable[[], Awaitable[Any]]:
    """The request as an app makes it with bare httpx (streamed: parse each event and keep the
    chunks)."""
    headers = {"content-type": "application/json", "accept": "application/json"}
    sse_headers = {"content-type": "application/json", "accept": "text/event-stream"}

    async def plain() -> Any:
        body = {"temperature": 0.2, "max_tokens": 256, "model": MODEL, "messages": messages}
        response = await http.post("chat/completions", content=orjson.dumps(body), headers=headers)
        response.raise_for_status()
        return orjson.loads(response.content)

    async def streamed() -> Any:
        body = {"temperature": 0.2, "max_tokens": 256, "stream": True,
                "stream_options": {"include_usage": True}, "model": MODEL, "messages": messages}
        chunks = []
        async with http.stream(
            "POST", "chat/completions", content=orjson.dumps(body), headers=sse_headers
        ) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(orjson.loads(line[6:]))
        return chunks

    return streamed if stream else plain


def middleware(
    mode: str, base_url: str, http: httpx.AsyncClient, redis_url: str, log_dir: Path
) -> VLLMMiddleware:
    """The middleware of a mode (`nolog`: logging off; `redis`; else embedded) on `http`."""
    return VLLMMiddleware(
        base_url,
        log_dir=log_dir,
        redis_url=redis_url if mode == "redis" else "",
        enable_file_logging=mode != "nolog",
        http_client=http,
        host="bench-client",
        stream="bench:logs",
    )


def middleware_call(
    mw: VLLMMiddleware, messages: list[dict[str, str]], stream: bool
) -> Callable[[], Awaitable[Any]]:
    """The same request through the middleware (streamed: every chunk read)."""

    async def plain() -> Any:
        return await mw.chat_completion(messages, model=MODEL, temperature=0.2, max_tokens=256)

    async def streamed() -> Any:
        replies = await mw.chat_completion(
            messages, model=MODEL, temperature=0.2, max_tokens=256, stream=True
        )
        return [chunk async for chunk in replies]

    return streamed if stream else plain


async def one_run(
    mode: str,
    transport: str,
    base_url: str,
    redis_url: str,
    log_root: Path,
    total: int,
    concurrency: int,
    stream: bool = False,
) -> tuple[float, float, float]:
    """(client CPU µs per request, requests/s, writer process CPU µs per request) of one run."""
    messages = sample_messages()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    if transport == "mock":
        http = httpx.AsyncClient(
            base_url=base_url,
            transport=httpx.MockTransport(sse_handler if stream else mock_handler),
            limits=limits,
        )
    else:
        http = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60)
    mw: VLLMMiddleware | None = None
    log_dir = Path(tempfile.mkdtemp(dir=log_root))
    if mode == "bare":
        call = bare_call(http, messages, stream)
    else:
        os.environ["VLLM_MW_EMBEDDED_WRITER"] = "thread" if mode == "embedded-thread" else "auto"
        mw = middleware(mode, base_url, http, redis_url, log_dir)
        call = middleware_call(mw, messages, stream)
    # Warm-up outside the window: connections (HTTP, Redis), the writer's first file.
    await drive(call, 64, min(concurrency, 8))
    if mw is not None:
        await wait_shipped(mw)
    writer_cpu0 = writer_cpu(mw)
    with quiet_gc():
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        await drive(call, total, concurrency)
        wall = time.perf_counter() - wall0
        if mw is not None:
            await wait_shipped(mw)
        cpu = time.process_time() - cpu0
    writer = writer_cpu(mw) - writer_cpu0
    if mw is not None:
        assert mw._sink is None or mw._sink.counters.dropped == 0
        await mw.close()
    await http.aclose()
    shutil.rmtree(log_dir, ignore_errors=True)
    return cpu / total * 1e6, total / wall, writer / total * 1e6


def writer_cpu(mw: VLLMMiddleware | None) -> float:
    """CPU seconds (user + system) the embedded writer process has used so far; 0 without one."""
    # The shipper holds its sink; an embedded one (`FileSink`) holds the writer process.
    sink = getattr(mw._sink, "sink", None) if mw is not None else None
    process = getattr(sink, "process", None)
    pid = process.pid if process is not None else None
    if pid is None:
        return 0.0
    # schedstat's first field is the task's time on a CPU in ns (stat counts 10 ms ticks).
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9


def record_size(base_url: str, log_root: Path) -> float:
    """Average bytes per logged record for this request mix (embedded mode, mock transport)."""

    async def go() -> float:
        log_dir = Path(tempfile.mkdtemp(dir=log_root))
        http = httpx.AsyncClient(base_url=base_url, transport=httpx.MockTransport(mock_handler))
        async with VLLMMiddleware(base_url, log_dir=log_dir, redis_url="", http_client=http) as mw:
            for _ in range(100):
                await mw.chat_completion(sample_messages(), model=MODEL, temperature=0.2,
                                         max_tokens=256)
        await http.aclose()
        size = sum(p.stat().st_size for p in log_dir.rglob("*.jsonl"))
        shutil.rmtree(log_dir, ignore_errors=True)
        return size / 100

    return asyncio.run(go())


async def main_async(args: Any, redis_url: str, fake_url: str, log_root: Path) -> None:
    # (transport, streaming, concurrency, requests, repeats)
    plans: list[tuple[str, bool, int, int, int]] = []
    if args.quick:
        plans = [("mock", False, 1, 1000, 3), ("mock", False, 32, 1000, 3),
                 ("mock", True, 1, 500, 3), ("mock", True, 32, 500, 3),
                 ("http", False, 1, 300, 2), ("http", False, 32, 300, 2),
                 ("http", True, 1, 200, 2)]
    else:
        plans = [("mock", False, 1, 3000, 7), ("mock", False, 32, 3000, 7),
                 ("mock", True, 1, 1500, 7), ("mock", True, 32, 1500, 7),
                 ("http", False, 1, 1000, 5), ("http", False, 32, 1000, 5),
                 ("http", True, 1, 500, 5), ("http", True, 32, 500, 5)]
    if args.only:
        plans = [p for p in plans if f"{p[0]}-{'stream' if p[1] else 'json'}" in args.only]
    rows: list[list[Any]] = []
    summary: list[list[Any]] = []
    for transport, stream, concurrency, total, repeats in plans:
        kind = "stream" if stream else "json"
        base_url = "http://mock.invalid/v1" if transport == "mock" else fake_url
        results = {mode: Result() for mode in MODES}
        for rep in range(repeats):
            order = MODES[rep % len(MODES):] + MODES[: rep % len(MODES)]  # rotate who goes first
            for mode in order:
                cpu_us, rps, writer_us = await one_run(
                    mode, transport, base_url, redis_url, log_root, total, concurrency, stream
                )
                results[mode].cpu_us.append(cpu_us)
                results[mode].writer_us.append(writer_us)
                results[mode].rps.append(rps)
        bare = results["bare"]
        for mode in MODES:
            res = results[mode]
            added = [m - b for m, b in zip(res.cpu_us, bare.cpu_us, strict=True)]
            ratio = [m / b * 100 for m, b in zip(res.rps, bare.rps, strict=True)]
            rows.append([
                transport, kind, concurrency, mode, total, repeats,
                median(res.cpu_us), min(res.cpu_us), median(res.rps),
                "" if mode == "bare" else f"{median(added):+.1f}",
                "" if mode == "bare" else f"{median(ratio):.1f}%",
                f"{median(res.writer_us):.1f}" if mode == "embedded" else "",
            ])
            if mode in ("redis", "embedded", "embedded-thread"):
                summary.append([
                    transport, kind, concurrency, mode, f"{median(added):+.1f}",
                    f"{median(ratio):.1f}%",
                    "yes" if median(added) <= 15 and median(ratio) >= 97 else "NO",
                ])
        print(f"  done: {transport} {kind} c={concurrency}", flush=True)
    print_table(
        "Client CPU and throughput per mode (medians over repetitions)",
        ["transport", "reply", "conc", "client", "req/run", "reps", "CPU µs/req", "min CPU µs/req",
         "req/s", "added µs/req", "throughput vs bare", "writer process µs/req"],
        rows,
    )
    print_table(
        "Targets: ≤15 µs added CPU per request, ≥97% of bare throughput",
        ["transport", "reply", "conc", "client", "added µs/req", "throughput vs bare", "met"],
        summary,
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="plans to run: mock-json mock-stream "
                        "http-json http-stream (default: all)")
    args = parser.parse_args()
    banner("client_overhead", args)
    log_root = Path(tempfile.mkdtemp(prefix="bench-client-", dir=os.environ.get("BENCH_DIR")))
    size = record_size("http://mock.invalid/v1", log_root)
    print(f"  record size for this request mix: {size:.0f} B")
    fake = FakeServer()
    try:
        with RedisServerProcess() as redis_server:
            asyncio.run(main_async(args, redis_server.url, fake.base_url, log_root))
    finally:
        fake.close()
        shutil.rmtree(log_root, ignore_errors=True)


if __name__ == "__main__":
    main()
