"""A client per request: what creating, using and closing a `VLLMMiddleware` costs.

Three ways to make N calls, one after another, over an `httpx.MockTransport` (its handler
yields to the loop once, as real I/O does): `long-lived` (one client, N calls), `per-call`
(N times: a client on a shared injected HTTP client, one call, `close`), and `per-call own
HTTP` (the same, the middleware making its own HTTP client as it does without
`http_client=`; the mock transport is swapped in after construction, so construction is paid
in full). Embedded mode (fresh log directory per run) and Redis mode (a private
redis-server). Wall milliseconds per call (close included: it waits until the record is
durable), and, embedded, the files left in the log tree.

Each case runs in a fresh interpreter with this checkout's client and with the client of
`--baseline` (default `main`), interleaved. Target: a client per call costs at most a few
ms more than a call on a long-lived client, and the files do not grow with the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

SCRIPT = Path(__file__).resolve()
MODEL = "vllm:qwen-2.5-omni-7b"
WAYS = ("long-lived", "per-call", "per-call own HTTP")


async def child_run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from _common import sample_messages
    from vllm_middleware import VLLMMiddleware

    reply = orjson.dumps(
        {"id": "x", "object": "chat.completion", "model": MODEL,
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}]}
    )  # fmt: skip

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)
        return httpx.Response(200, content=reply, headers={"content-type": "application/json"})

    # base_url on the injected client too: the baseline needs it (issue 10 item 1)
    http = httpx.AsyncClient(base_url="http://up/v1", transport=httpx.MockTransport(handler))
    where: dict[str, Any] = (
        {"redis_url": args.redis_url} if args.mode == "redis"
        else {"redis_url": "", "log_dir": args.log_dir}
    )  # fmt: skip
    messages = sample_messages()

    def make(own_http: bool) -> VLLMMiddleware:
        if not own_http:
            return VLLMMiddleware(base_url="http://up/v1", http_client=http, **where)
        client = VLLMMiddleware(base_url="http://up/v1", **where)
        owned, client._http = client._http, http  # the mock instead of the network
        client._owns_http = False
        asyncio.get_running_loop().create_task(owned.aclose())
        return client

    # Warm-up (untimed, both versions): imports, the first writer start, the first connect.
    warm = make(args.way == "per-call own HTTP")
    await warm.chat_completion(messages, model=MODEL)
    await warm.close()
    started = time.perf_counter()
    if args.way == "long-lived":
        client = make(False)
        for _ in range(args.calls):
            await client.chat_completion(messages, model=MODEL)
        await client.close()
    else:
        for _ in range(args.calls):
            client = make(args.way == "per-call own HTTP")
            await client.chat_completion(messages, model=MODEL)
            await client.close()
    elapsed = time.perf_counter() - started
    files = len(list(Path(args.log_dir).rglob("*.jsonl"))) if args.mode == "embedded" else 0
    return {"ms_per_call": elapsed / args.calls * 1000, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--calls", type=int, help="calls per run")
    parser.add_argument("--repeats", type=int, help="runs per case")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="embedded")
    parser.add_argument("--way", default="per-call")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--log-dir", default="")
    args = parser.parse_args()
    sys.path.insert(0, str(SCRIPT.parent))
    if args.child:
        print(orjson.dumps(asyncio.run(child_run(args))).decode())
        return
    parent(args)


def parent(args: argparse.Namespace) -> None:
    from _common import banner, median, print_table
    from _versions import baseline_client, run_child
    from vllm_middleware_testing import RedisServerProcess

    banner("client_churn", args)
    calls = args.calls or (20 if args.quick else 50)
    repeats = args.repeats or (1 if args.quick else 3)
    baseline = baseline_client(args.baseline)
    versions: list[tuple[str, Path | None]] = [(f"before ({args.baseline})", baseline),
                                               ("after (this checkout)", None)]
    scratch = Path(tempfile.mkdtemp(prefix="bench-churn-"))
    os.environ["VLLM_MW_SPOOL_DIR"] = str(scratch / "spool")  # never ~/.cache
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    with RedisServerProcess(tmp_dir=scratch) as server:
        for _ in range(repeats):
            for mode in ("embedded", "redis"):
                for way in WAYS:
                    for name, client_dir in versions:
                        log_dir = tempfile.mkdtemp(dir=scratch)
                        result = run_child(SCRIPT, client_dir, [
                            "--mode", mode, "--way", way, "--calls", str(calls),
                            "--redis-url", server.url, "--log-dir", log_dir,
                        ])  # fmt: skip
                        shutil.rmtree(log_dir, ignore_errors=True)
                        results.setdefault((mode, way, name), []).append(result)
            print("  done: one round", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(baseline.parent, ignore_errors=True)
    rows = []
    for mode in ("embedded", "redis"):
        for name, _ in versions:
            base = median([r["ms_per_call"] for r in results[(mode, "long-lived", name)]])
            for way in WAYS:
                runs = results[(mode, way, name)]
                ms = median([r["ms_per_call"] for r in runs])
                files = max(r["files"] for r in runs) if mode == "embedded" else "-"
                extra = "" if way == "long-lived" else f"{ms - base:+.2f}"
                rows.append([mode, name, way, calls, f"{ms:.2f}", extra, files])
    print_table(
        f"Client per call vs long-lived ({calls} calls per run, median of {repeats} runs)",
        ["mode", "client", "way", "calls", "ms per call", "extra ms vs long-lived",
         "files left (embedded)"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
