"""Instructions per request (callgrind) of the client over a mock transport, for two copies
of the client code in the same run (e.g. a base commit and the working tree).

    git archive BASE client worker | tar -x -C /tmp/base
    python bench/callgrind_overhead.py --base /tmp/base --new . [--requests 1500]

Each (code, reply kind) is run twice under valgrind, with N and N/5 requests, embedded mode
(writer thread, so its instructions are counted); the difference divided by the difference in
requests cancels start-up and connection set-up. Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL = "vllm:qwen-2.5-omni-7b"


def _reply(body: dict[str, Any], stream: bool) -> Any:
    import httpx
    import orjson

    head = {"id": "chatcmpl-b", "created": 1_700_000_000, "model": MODEL}
    if not stream:
        return httpx.Response(
            200,
            content=orjson.dumps(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Paris is the capital."},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
                }
            ),
            headers={"content-type": "application/json"},
        )
    chunk = {**head, "object": "chat.completion.chunk"}
    events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [
        {**chunk, "choices": [{"index": 0, "delta": {"content": f" w{i}"}}]} for i in range(20)
    ]
    events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({**chunk, "choices": [], "usage": {"prompt_tokens": 9, "total_tokens": 30}})
    data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    return httpx.Response(200, content=data, headers={"content-type": "text/event-stream"})


async def _drive(n: int, stream: bool, log_dir: str) -> None:
    import httpx
    import orjson
    from vllm_middleware import VLLMMiddleware

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)
        return _reply(orjson.loads(request.content), stream)  # type: ignore[no-any-return]

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://m/v1")
    client = VLLMMiddleware(
        "http://m/v1", log_dir=log_dir, redis_url="", http_client=http, flush_interval=2.5
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for _ in range(n):
        if stream:
            async with await client.chat_completion(messages, model=MODEL, stream=True) as s:
                async for _ in s:
                    pass
        else:
            await client.chat_completion(messages, model=MODEL, max_tokens=16)
    await client.close()
    await http.aclose()


def _instructions(code: Path, n: int, stream: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{code / 'client'}:{code / 'worker'}"
        env["VLLM_MW_EMBEDDED_WRITER"] = "thread"
        out = Path(tmp) / "cg.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                str(n),
                "stream" if stream else "json",
                str(Path(tmp) / "logs"),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        summary = re.search(rb"^summary: (\d+)", out.read_bytes(), re.MULTILINE)
        assert summary is not None
        return int(summary.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--new", type=Path)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        n, kind, log_dir = args.child
        asyncio.run(_drive(int(n), kind == "stream", log_dir))
        return
    big, small = args.requests, args.requests // 5
    rows = []
    for kind in ("json", "stream"):
        per = {}
        for label, code in (("base", args.base), ("new", args.new)):
            hi = _instructions(code.resolve(), big, kind == "stream")
            lo = _instructions(code.resolve(), small, kind == "stream")
            per[label] = (hi - lo) / (big - small)
        delta = per["new"] - per["base"]
        rows.append((kind, per["base"], per["new"], delta, 100 * delta / per["base"]))
    print("| reply | base instr/req | new instr/req | change | change % |")
    print("|---|---:|---:|---:|---:|")
    for kind, base, new, delta, pct in rows:
        cells = [kind, f"{base / 1000:.1f}k", f"{new / 1000:.1f}k", f"{delta / 1000:+.1f}k"]
        print("| " + " | ".join([*cells, f"{pct:+.2f}%"]) + " |")


if __name__ == "__main__":
    main()
