"""Instructions per request under callgrind: bare httpx vs `VLLMMiddleware`, two versions.

The same chat request as `client_overhead.py` (system + user message, ~1 KB record) over an
`httpx.MockTransport` whose handler yields once, at concurrency 1 and 32, through `bare`
httpx, `redis` (a private redis-server) and `embedded` (writer process) clients. Each run is
traced whole by `valgrind --tool=callgrind` (all threads of the app: the shipping thread
included; not redis-server nor the writer process, which run on the other core); the figure
is (instructions of a run of N requests - those of a run of M) / (N - M), so start-up, imports
and the first flushes cancel out. Instruction counts do not depend on the machine's speed or
load, so they resolve what the clock cannot on a shared 2-core VM.

Under valgrind the program runs ~50 times slower: the logging runs use `flush_interval=2.5 s`
(flushes as large as in real time), `PYTHONHASHSEED=0` and `VLLM_MW_REDIS_TIMEOUT=300` (a flush
that times out would measure the spool instead). Both versions: this checkout and `--baseline`
(`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
MODEL = "vllm:qwen-2.5-omni-7b"
# bare-url: bare with the URL parsed once (as the middleware now does), not on every call;
# nolog: the middleware with logging off (what a record adds is redis/embedded - nolog)
MODES = ("bare", "bare-url", "nolog", "redis", "embedded")


async def child(args: argparse.Namespace) -> None:
    import httpx
    import orjson
    from _common import sample_messages

    messages = sample_messages()

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)
        body = orjson.loads(request.content)
        reply = {
            "id": "chatcmpl-bench", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
        }  # fmt: skip
        return httpx.Response(200, content=orjson.dumps(reply))

    # base_url on the injected client too: the baseline needs it (issue 10 item 1)
    if args.stream:
        from client_overhead import sse_handler

        handler = sse_handler  # type: ignore[assignment]
    http = httpx.AsyncClient(base_url="http://mock/v1", transport=httpx.MockTransport(handler))
    headers = {"content-type": "application/json", "accept": "application/json"}
    sse_headers = {"content-type": "application/json", "accept": "text/event-stream"}
    mw: Any = None
    if args.mode in ("bare", "bare-url"):
        url: Any = "chat/completions"
        if args.mode == "bare-url":
            url = httpx.URL("http://mock/v1/chat/completions")

        async def call() -> Any:
            body = {"temperature": 0.2, "max_tokens": 256, "model": MODEL, "messages": messages}
            if args.stream:  # as an app does: stream, parse each event, keep the chunks
                body.update(stream=True, stream_options={"include_usage": True})
                chunks = []
                async with http.stream("POST", url, content=orjson.dumps(body),
                                       headers=sse_headers) as response:  # fmt: skip
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks.append(orjson.loads(line[6:]))
                return chunks
            response = await http.post(url, content=orjson.dumps(body),
                                       headers=headers)  # fmt: skip
            return orjson.loads(response.content)
    else:
        from vllm_middleware import VLLMMiddleware

        where: dict[str, Any] = (
            {"redis_url": args.redis_url} if args.mode == "redis"
            else {"enable_file_logging": False} if args.mode == "nolog"
            else {"redis_url": "", "log_dir": args.log_dir}
        )  # fmt: skip
        mw = VLLMMiddleware(base_url="http://mock/v1", http_client=http, flush_interval=2.5,
                            **where)  # fmt: skip

        async def call() -> Any:
            if args.stream:
                stream = await mw.chat_completion(messages, model=MODEL, temperature=0.2,
                                                  max_tokens=256, stream=True)  # fmt: skip
                return [chunk async for chunk in stream]
            return await mw.chat_completion(messages, model=MODEL, temperature=0.2,
                                            max_tokens=256)  # fmt: skip

    remaining = args.requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    if mw is not None:
        await mw.aclose(timeout=300)
    await http.aclose()


def instructions(client_dir: Path | None, args: list[str], scratch: Path) -> int:
    from _common import callgrind_total

    out = scratch / f"callgrind.{os.getpid()}.{len(list(scratch.iterdir()))}"
    env = {"VLLM_MW_REDIS_TIMEOUT": "300"}
    return callgrind_total(SCRIPT, args, out, client_dir=client_dir, env=env, keep=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--modes", nargs="*", default=list(MODES), help="clients to trace")
    parser.add_argument("--stream", action="store_true", help="streamed replies (~23 chunks)")
    parser.add_argument("--concurrencies", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="bare")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--log-dir", default="")
    args = parser.parse_args()
    sys.path.insert(0, str(SCRIPT.parent))
    if args.child:
        asyncio.run(child(args))
        return
    from _common import banner, print_table
    from _versions import baseline_client
    from vllm_middleware_testing import RedisServerProcess

    banner("callgrind_request", args)
    small, large = (200, 700) if args.quick else (500, 2500)
    baseline = baseline_client(args.baseline)
    versions: list[tuple[str, Path | None]] = [
        (f"before ({args.baseline})", baseline),
        ("after (this checkout)", None),
    ]
    scratch = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    os.environ["VLLM_MW_SPOOL_DIR"] = str(scratch / "spool")  # never ~/.cache
    per_request: dict[tuple[str, int, str], float] = {}
    with RedisServerProcess(tmp_dir=scratch / "redis") as server:
        for concurrency in args.concurrencies:
            for mode in args.modes:
                for name, client_dir in versions:
                    if mode.startswith("bare") and client_dir is not None:
                        continue  # bare httpx does not depend on the client's version
                    counts = []
                    for requests in (small, large):
                        log_dir = tempfile.mkdtemp(dir=scratch)
                        counts.append(instructions(client_dir, [
                            "--mode", mode, "--concurrency", str(concurrency),
                            "--requests", str(requests), "--redis-url", server.url,
                            "--log-dir", log_dir, *(["--stream"] if args.stream else []),
                        ], scratch))  # fmt: skip
                    per_request[(mode, concurrency, name)] = (counts[1] - counts[0]) / (
                        large - small
                    )
                    print(f"  done: {mode} c={concurrency} {name}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(baseline.parent, ignore_errors=True)
    rows = []
    for concurrency in args.concurrencies:
        bare = per_request.get(("bare", concurrency, versions[1][0]))
        for mode in args.modes:
            for name, _ in versions:
                value = per_request.get((mode, concurrency, name))
                if value is None:
                    continue
                added = "" if bare is None or mode == "bare" else f"{(value - bare) / 1000:+.1f}k"
                rows.append([concurrency, mode, name, f"{value / 1000:.1f}k", added])
    print_table(
        f"Instructions per {'streamed ' if args.stream else ''}request (callgrind; "
        f"({large:,} - {small:,}) / {large - small:,})",
        ["conc", "client", "version", "instructions/request", "added over bare"],
        rows,
    )


if __name__ == "__main__":
    main()
