"""Sync client overhead: bare `httpx.Client` vs `SyncVLLMMiddleware`, and the workaround it
replaces (`asyncio.run` per call on the async client), same MockTransport upstream.

Each block sends the same chat requests through one client, from one thread (c=1) or from the
threads of a pool sharing the client (c=8). The upstream is an `httpx.MockTransport` (no
network: isolates the client's own work) answering a JSON reply, or a streamed one (an SSE body
of a role chunk, ~20 content chunks, a finish chunk, a usage chunk and `[DONE]`, one body chunk
per event). The bare streaming client parses every event with orjson and keeps the chunks, as
an app would; the middleware also reassembles the reply for its record. The `embeddings` reply
is one of the other endpoints (`SyncVLLMMiddleware.embeddings`, shared with the async client):
8 short texts in, 8 vectors of 256 floats out, kept in the record as sizes and hashes.

Modes: `bare`; `nolog` (the middleware with logging off); `redis` (a private redis-server) and
`embedded` (files, through the writer process, whose CPU is read from /proc and shown apart, as
in `client_overhead.py`); `asyncio.run` (what a newcomer writes today: per call, `asyncio.run`
of a coroutine that opens a `VLLMMiddleware`, calls it and closes it; embedded, c=1 only).

CPU is `time.process_time()` of this process (every thread: the callers and the shipper). The
window of each block covers its calls and waiting until every record has been shipped. Every
mode's client is made once per plan; blocks of the modes are interleaved in rounds (the order
rotating), and "added" is the median over rounds of the paired difference (mode minus the bare
block of the same round), so a loaded machine shifts both sides of each difference.
`asyncio.run` leaves threads winding down after each call (its sink's, its loop's), which
would be charged to the next block: it runs after the other modes, paired with bare blocks.

`--callgrind` counts instructions per call instead (c=1, every mode, JSON and streamed): each
run traced whole by `valgrind --tool=callgrind`, (instructions of N calls - those of M) /
(N - M). Instruction counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
from _common import banner, base_parser, median, print_table, quiet_gc, sample_messages
from client_overhead import MODEL, STREAM_CHUNKS, writer_cpu
from vllm_middleware import SyncVLLMMiddleware, VLLMMiddleware
from vllm_middleware_testing import RedisServerProcess

MODES = ("bare", "nolog", "redis", "embedded", "asyncio.run")
BASE_URL = "http://mock.invalid/v1"
# The bare client's URL is parsed once, as the middleware does with its own (a relative URL
# string costs httpx a merge and a parse on every call).
CHAT_URL = httpx.URL(f"{BASE_URL}/chat/completions")
EMBEDDINGS_URL = httpx.URL(f"{BASE_URL}/embeddings")
EMBEDDING_TEXTS = [f"passage {i}: a short text to embed for retrieval" for i in range(8)]
EMBEDDING_DIM = 256
REPLIES = ("json", "stream", "embeddings")
JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


def _reply(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body.get("model", MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"Echo: {_text(body)}"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 48, "completion_tokens": 44, "total_tokens": 92},
    }


def _text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def _frames(body: dict[str, Any]) -> list[bytes]:
    """The SSE events of a streamed reply (as `client_overhead.sse_handler` sends them)."""
    words = f"Echo: {_text(body)}".split()
    per = max(1, len(words) // STREAM_CHUNKS)
    pieces = [" ".join(words[i : i + per]) + " " for i in range(0, len(words), per)]
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": body.get("model", MODEL),
    }

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    events = [{**base, "choices": [choice({"role": "assistant", "content": ""})]}]
    events += [{**base, "choices": [choice({"content": piece})]} for piece in pieces]
    events.append({**base, "choices": [choice({}, "stop")]})
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 48, "completion_tokens": 44, "total_tokens": 92}
        events.append({**base, "choices": [], "usage": usage})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def _embeddings_reply(body: dict[str, Any]) -> dict[str, Any]:
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [(i + j) / 1000 for j in range(EMBEDDING_DIM)],
        }
        for i in range(len(body["input"]))
    ]
    usage = {"prompt_tokens": 80, "total_tokens": 80}
    return {"id": "embd-bench", "object": "list", "model": MODEL, "data": data, "usage": usage}


def sync_handler(request: httpx.Request) -> httpx.Response:
    body = orjson.loads(request.content)
    if request.url.path.endswith("/embeddings"):
        content = orjson.dumps(_embeddings_reply(body))
        return httpx.Response(200, content=content, headers={"content-type": "application/json"})
    if body.get("stream"):
        frames = _frames(body)

        def chunks() -> Iterator[bytes]:
            yield from frames

        return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})
    return httpx.Response(
        200, content=orjson.dumps(_reply(body)), headers={"content-type": "application/json"}
    )


async def async_handler(request: httpx.Request) -> httpx.Response:
    body = orjson.loads(request.content)
    if request.url.path.endswith("/embeddings"):
        content = orjson.dumps(_embeddings_reply(body))
        return httpx.Response(200, content=content, headers={"content-type": "application/json"})
    if body.get("stream"):
        frames = _frames(body)

        async def chunks() -> Any:
            for frame in frames:
                yield frame

        return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})
    return httpx.Response(
        200, content=orjson.dumps(_reply(body)), headers={"content-type": "application/json"}
    )


def drive(call: Callable[[], Any], total: int, concurrency: int, pool: ThreadPoolExecutor) -> None:
    if concurrency == 1:
        for _ in range(total):
            call()
        return
    per, extra = divmod(total, concurrency)

    def worker(n: int) -> None:
        for _ in range(n):
            call()

    futures = [pool.submit(worker, per + (i < extra)) for i in range(concurrency)]
    for future in futures:
        future.result()


def wait_shipped(mw: SyncVLLMMiddleware | None) -> None:
    sink = mw._sink if mw is not None else None
    while sink is not None and sink.buffered:
        time.sleep(0.002)


class Runner:
    """One mode's client, kept for the whole plan so each timed block is only calls."""

    def __init__(
        self, mode: str, reply: str, redis_url: str, log_root: Path, flush_interval: float = 0.05
    ) -> None:
        self.mode = mode
        stream = reply == "stream"
        messages = sample_messages()
        self.log_dir = log_dir = Path(tempfile.mkdtemp(dir=log_root))
        self.http = http = httpx.Client(
            base_url=BASE_URL,
            transport=httpx.MockTransport(sync_handler),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )
        self.mw: SyncVLLMMiddleware | None = None
        self.call: Callable[[], Any]
        if mode == "bare":

            def bare_call() -> Any:
                body = {"temperature": 0.2, "max_tokens": 256, "model": MODEL, "messages": messages}
                content = orjson.dumps(body)
                response = http.post(CHAT_URL, content=content, headers=JSON_HEADERS)
                response.raise_for_status()
                return orjson.loads(response.content)

            def bare_stream() -> Any:
                body = {
                    "temperature": 0.2,
                    "max_tokens": 256,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "model": MODEL,
                    "messages": messages,
                }
                chunks = []
                with http.stream(
                    "POST", CHAT_URL, content=orjson.dumps(body), headers=SSE_HEADERS
                ) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks.append(orjson.loads(line[6:]))
                return chunks

            def bare_embeddings() -> Any:
                body = {"model": MODEL, "input": EMBEDDING_TEXTS}
                content = orjson.dumps(body)
                response = http.post(EMBEDDINGS_URL, content=content, headers=JSON_HEADERS)
                response.raise_for_status()
                return orjson.loads(response.content)

            self.call = {"json": bare_call, "stream": bare_stream, "embeddings": bare_embeddings}[
                reply
            ]
        elif mode == "asyncio.run":

            async def per_call() -> Any:
                async with (
                    httpx.AsyncClient(transport=httpx.MockTransport(async_handler)) as ahttp,
                    VLLMMiddleware(
                        BASE_URL, log_dir=log_dir, redis_url="", http_client=ahttp
                    ) as amw,
                ):
                    if reply == "embeddings":
                        return await amw.embeddings(EMBEDDING_TEXTS, model=MODEL)
                    if not stream:
                        return await amw.chat_completion(
                            messages, model=MODEL, temperature=0.2, max_tokens=256
                        )
                    replies = await amw.chat_completion(
                        messages, model=MODEL, temperature=0.2, max_tokens=256, stream=True
                    )
                    return [chunk async for chunk in replies]

            def workaround() -> Any:
                return asyncio.run(per_call())

            self.call = workaround
        else:
            self.mw = client = SyncVLLMMiddleware(
                BASE_URL,
                log_dir=log_dir,
                redis_url=redis_url if mode == "redis" else "",
                enable_file_logging=mode != "nolog",
                http_client=http,
                host="bench-client",
                stream="bench:logs",
                flush_interval=flush_interval,
            )

            def mw_call() -> Any:
                return client.chat_completion(
                    messages, model=MODEL, temperature=0.2, max_tokens=256
                )

            def mw_stream() -> Any:
                with client.chat_completion(
                    messages, model=MODEL, temperature=0.2, max_tokens=256, stream=True
                ) as replies:
                    return list(replies)

            def mw_embeddings() -> Any:
                return client.embeddings(EMBEDDING_TEXTS, model=MODEL)

            self.call = {"json": mw_call, "stream": mw_stream, "embeddings": mw_embeddings}[reply]

    def block(self, calls: int, concurrency: int, pool: ThreadPoolExecutor) -> tuple[float, float]:
        """(client CPU µs per call, writer process CPU µs per call) of `calls` calls, until
        their records are shipped."""
        writer0 = writer_cpu(self.mw)  # type: ignore[arg-type]
        with quiet_gc():
            cpu0 = time.process_time()
            drive(self.call, calls, concurrency, pool)
            wait_shipped(self.mw)
            cpu = time.process_time() - cpu0
        writer = writer_cpu(self.mw) - writer0  # type: ignore[arg-type]
        return cpu / calls * 1e6, writer / calls * 1e6

    def close(self) -> None:
        if self.mw is not None:
            assert self.mw._sink is None or self.mw._sink.counters.dropped == 0
            self.mw.close()
        self.http.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)


def child(args: argparse.Namespace) -> None:
    """Under callgrind: `args.calls` calls of one mode from one thread, then close."""
    # ~50 times slower under valgrind: flushes as large as in real time need a longer interval.
    runner = Runner(args.mode, args.reply, args.redis_url, Path(args.log_root), 2.5)
    for _ in range(args.calls):
        runner.call()
    if runner.mw is not None:
        runner.mw.close(timeout=300)
        runner.mw = None
    runner.close()


def instructions(args: list[str], scratch: Path) -> int:
    out = scratch / f"callgrind.{len(list(scratch.iterdir()))}"
    # Under valgrind everything is ~50 times slower: a flush must not time out into the spool.
    env = dict(os.environ, VLLM_MW_REDIS_TIMEOUT="300", VLLM_MW_SPOOL_DIR=str(scratch / "spool"))
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    command += [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=3600)
    text = out.read_text(errors="replace")
    match = re.search(r"^summary:\s+(\d+)", text, re.MULTILINE) or re.search(
        r"^totals:\s+(\d+)", text, re.MULTILINE
    )
    assert match, f"no summary in {out}"
    return int(match.group(1))


def callgrind(quick: bool, replies: list[str], modes: list[str]) -> None:
    """Instructions per call (all the app's threads; not redis-server nor the writer process):
    (instructions of a run of N calls - those of M calls) / (N - M), so start-up cancels out."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-sync-callgrind-"))
    rows: list[list[Any]] = []
    try:
        with RedisServerProcess(tmp_dir=scratch / "redis") as server:
            for reply in replies:
                per_call: dict[str, float] = {}
                for mode in modes:
                    small, large = (10, 30) if mode == "asyncio.run" else (200, 600)
                    if quick:
                        small, large = small // 2, large // 2
                    counts = []
                    for calls in (small, large):
                        common = ["--mode", mode, "--calls", str(calls)]
                        common += ["--redis-url", server.url, "--log-root", str(scratch)]
                        counts.append(instructions([*common, "--reply", reply], scratch))
                    per_call[mode] = (counts[1] - counts[0]) / (large - small)
                    print(f"  done: callgrind {mode} {reply}", flush=True)
                for mode, value in per_call.items():
                    added = value - per_call["bare"]
                    rows.append(
                        [
                            reply,
                            mode,
                            f"{value / 1000:.1f}k",
                            "" if mode == "bare" else f"{added / 1000:+.1f}k",
                        ]
                    )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(
        "Instructions per call, c=1 (callgrind: the load of the machine does not change them)",
        ["reply", "client", "instructions/call", "added over bare"],
        rows,
    )


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--replies", nargs="*", default=list(REPLIES), choices=REPLIES)
    parser.add_argument("--modes", nargs="*", default=list(MODES), help="--callgrind: bare first")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="bare", help=argparse.SUPPRESS)
    parser.add_argument("--reply", default="json", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--log-root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    banner("sync_client", args)
    if args.callgrind:
        callgrind(args.quick, args.replies, args.modes)
        return
    rounds = 4 if args.quick else args.rounds
    calls = 200  # per block
    slow_calls = 10  # asyncio.run per call: milliseconds each
    log_root = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=os.environ.get("BENCH_DIR")))
    rows: list[list[Any]] = []
    summary: list[list[Any]] = []
    try:
        with RedisServerProcess() as redis_server, ThreadPoolExecutor(max_workers=8) as pool:
            for kind in args.replies:
                for concurrency in (1, 8):
                    # asyncio.run per call leaves threads winding down after each call: it is
                    # measured after the other modes, paired with bare blocks of its own.
                    modes = [m for m in MODES if m != "asyncio.run"]
                    runners = {m: Runner(m, kind, redis_server.url, log_root) for m in MODES}
                    for runner in runners.values():  # warm-up: connections, first files
                        runner.block(slow_calls, concurrency, pool)
                    cpu: dict[str, list[float]] = {m: [] for m in MODES}
                    writer: dict[str, list[float]] = {m: [] for m in MODES}
                    added: dict[str, list[float]] = {m: [] for m in MODES}
                    for rnd in range(rounds):
                        order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
                        for mode in order:
                            us, writer_us = runners[mode].block(calls, concurrency, pool)
                            cpu[mode].append(us)
                            writer[mode].append(writer_us)
                    for mode in modes:
                        added[mode] = [m - b for m, b in zip(cpu[mode], cpu["bare"], strict=True)]
                    if concurrency == 1:
                        modes.append("asyncio.run")
                        for _ in range(max(3, rounds // 5)):
                            bare_us = runners["bare"].block(calls, concurrency, pool)[0]
                            us = runners["asyncio.run"].block(slow_calls, concurrency, pool)[0]
                            cpu["asyncio.run"].append(us)
                            added["asyncio.run"].append(us - bare_us)
                    for runner in runners.values():
                        runner.close()
                    for mode in modes:
                        rows.append(
                            [
                                kind,
                                concurrency,
                                mode,
                                median(cpu[mode]),
                                min(cpu[mode]),
                                "" if mode == "bare" else f"{median(added[mode]):+.1f}",
                                f"{median(writer[mode]):.1f}" if mode == "embedded" else "",
                            ]
                        )
                        if mode in ("redis", "embedded") and kind != "stream":
                            met = median(added[mode]) <= 15
                            summary.append(
                                [
                                    kind,
                                    concurrency,
                                    mode,
                                    f"{median(added[mode]):+.1f}",
                                    "yes" if met else "NO",
                                ]
                            )
                    print(f"  done: {kind} c={concurrency}", flush=True)
    finally:
        shutil.rmtree(log_root, ignore_errors=True)
    print(f"\n  {rounds} rounds; a block is {calls} calls ({slow_calls} for asyncio.run)")
    print_table(
        "Client CPU per call, sync (medians over rounds)",
        [
            "reply",
            "conc",
            "client",
            "CPU µs/call",
            "min CPU µs/call",
            "added µs/call",
            "writer process µs/call",
        ],
        rows,
    )
    print_table(
        "Target: ≤15 µs added CPU per non-streaming call over bare httpx.Client",
        ["reply", "conc", "client", "added µs/call", "met"],
        summary,
    )


if __name__ == "__main__":
    main()
