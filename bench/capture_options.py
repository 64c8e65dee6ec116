"""Capture options: the client CPU each of `redact=`, `redact_secrets`, `content="metadata"` and
`sample_rate` adds per request, against the same client without options, same run.

Each run sends the same chat requests (a ~1 KB record; `--user-bytes` for longer messages)
through `VLLMMiddleware` in embedded mode over an `httpx.MockTransport` (one event-loop turn
per request, as in `client_overhead.py`), and waits until every record is written. Runs of
all options are interleaved (default, option A, option B, ..., default, ...) and repeated;
"added" is the median over rounds of the paired difference with the default run of the same
round. CPU is `time.process_time()` of this process; the files are written by the embedded
writer process, whose CPU is not counted (options that make records smaller or rarer save
some of it).

A second table times the record transformations alone (no HTTP, no shipping) on the same
record: `redact_secrets` on text without secrets and with a secret of each kind, and the
metadata summary, next to `encode_record` of the same record (what every request pays) as a
yardstick that scales with the machine's load.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from _common import banner, base_parser, median, print_table, quiet_gc, sample_messages
from vllm_middleware import VLLMMiddleware, redact_secrets
from vllm_middleware._capture import metadata_only
from vllm_middleware._record import encode_record

MODEL = "vllm:qwen-2.5-omni-7b"

OPTIONS: dict[str, dict[str, Any]] = {
    "default (no option)": {},
    "redact=identity hook": {"redact": lambda record: record},
    "redact=redact_secrets": {"redact": redact_secrets},
    'content="metadata"': {"content": "metadata"},
    "sample_rate=0.1": {"sample_rate": 0.1},
    "metadata + redact_secrets + 0.5": {
        "content": "metadata",
        "redact": redact_secrets,
        "sample_rate": 0.5,
    },
}


async def handler(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(0)  # one event-loop turn, as real I/O gives
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
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 48, "completion_tokens": 44, "total_tokens": 92},
    }
    return httpx.Response(200, content=orjson.dumps(reply))


async def one_run(options: dict[str, Any], log_root: Path, total: int, user_bytes: int) -> float:
    """Client CPU µs per request."""
    messages = sample_messages(user_bytes)
    http = httpx.AsyncClient(base_url="http://bench/v1", transport=httpx.MockTransport(handler))
    log_dir = Path(tempfile.mkdtemp(dir=log_root))
    mw = VLLMMiddleware(base_url="http://bench/v1", log_dir=log_dir, http_client=http, **options)
    try:
        await mw.chat_completion(messages, model=MODEL)  # the writer process starts here
        sink = mw._sink
        while sink is not None and sink.buffered:  # noqa: ASYNC110 - polls the sink's state
            await asyncio.sleep(0.002)
        with quiet_gc():
            start = time.process_time()
            for _ in range(total):
                await mw.chat_completion(messages, model=MODEL, temperature=0.2, max_tokens=256)
            while sink is not None and sink.buffered:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            cpu = time.process_time() - start
    finally:
        await mw.close()
        await http.aclose()
        shutil.rmtree(log_dir, ignore_errors=True)
    return cpu / total * 1e6


def time_transform(fn: Callable[[dict[str, Any]], Any], record: dict[str, Any], n: int) -> float:
    copies = [copy.deepcopy(record) for _ in range(n)]
    start = time.perf_counter()
    for item in copies:
        fn(item)
    return (time.perf_counter() - start) / n * 1e6


def bench_record(user_bytes: int, secret: str = "") -> dict[str, Any]:
    messages = sample_messages(user_bytes)
    messages[-1]["content"] += secret
    return {
        "timestamp": "2026-01-01T00:00:00+00:00",
        "request_id": "req_1",
        "model": MODEL,
        "messages": messages,
        "response": {
            "id": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
        "parameters": {"temperature": 0.2, "max_tokens": 256},
        "latency_ms": 1.0,
        "error": None,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--user-bytes", type=int, default=100)
    args = parser.parse_args()
    banner("capture_options", args)
    total = args.requests or (500 if args.quick else 3000)
    rounds = args.rounds or (2 if args.quick else 5)
    log_root = Path(tempfile.mkdtemp(prefix="bench-capture-", dir=os.environ.get("BENCH_DIR")))
    cpu: dict[str, list[float]] = {name: [] for name in OPTIONS}
    try:
        for _ in range(rounds):
            for name, options in OPTIONS.items():
                cpu[name].append(asyncio.run(one_run(options, log_root, total, args.user_bytes)))
    finally:
        shutil.rmtree(log_root, ignore_errors=True)
    base = cpu["default (no option)"]
    rows = []
    for name, values in cpu.items():
        added = [v - b for v, b in zip(values, base, strict=True)]
        rows.append([name, median(values), median(added), ", ".join(f"{v:.0f}" for v in values)])
    print_table(
        f"Client CPU per request, embedded, c=1, {total} requests x {rounds} rounds "
        f"(user message {args.user_bytes} B)",
        ["options", "CPU µs/request", "added vs default µs", "all rounds µs"],
        rows,
    )
    n = 2000 if args.quick else 20_000
    plain = bench_record(args.user_bytes)
    secrets = bench_record(
        args.user_bytes,
        " key AKIAIOSFODNN7EXAMPLE card 4111 1111 1111 1111 Bearer abcdefghijklmnop",
    )
    long_text = bench_record(4000)
    rows = [
        ["redact_secrets, no secret", time_transform(redact_secrets, plain, n)],
        ["redact_secrets, 3 secrets", time_transform(redact_secrets, secrets, n)],
        ["redact_secrets, 4 KB message", time_transform(redact_secrets, long_text, n)],
        ["metadata summary", time_transform(metadata_only, plain, n)],
        # What every request already pays, to scale the rows above on a loaded machine.
        ["(reference) encode_record of the same record", time_transform(encode_record, plain, n)],
    ]
    print_table(f"The transformation alone, µs per record ({n} records)", ["step", "µs"], rows)


if __name__ == "__main__":
    main()
