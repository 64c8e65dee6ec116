"""The openai SDK with and without `instrument()`: CPU added per call by the capture transport.

The same SDK calls (`chat.completions.create`, a JSON reply, and the same with `stream=True`:
a role chunk, 20 content chunks, a finish chunk, a usage chunk and `[DONE]`, one body chunk
per event, iterated to the end) go through an `OpenAI` / `AsyncOpenAI` client whose HTTP
client has a mock upstream transport (no network: the SDK's and the capture's own work only),
bare and instrumented (embedded mode, the default writer process: a record is built, encoded
and handed to the writer in this process). Both HTTP libraries are measured: httpx2 (what
openai 3 builds on) and httpx (openai 1.x/2.x, or an httpx client passed to openai 3).

CPU is `time.process_time()` of this process (all its threads) over the calls. Runs are
interleaved (bare, instrumented, bare, ...) and repeated; "added" is the median over rounds of
the paired difference per call.
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
from _common import banner, base_parser, median, print_table, quiet_gc

MODEL = "vllm:qwen-2.5-omni-7b"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]
REPLY = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The capital of France is Paris."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 48, "completion_tokens": 8, "total_tokens": 56},
    }
)


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": choices,
    }
    if usage:
        event["usage"] = usage
    return b"data: " + orjson.dumps(event) + b"\n\n"


EVENTS = [
    _chunk({"role": "assistant", "content": ""}),
    *(_chunk({"content": f"word{i} "}) for i in range(20)),
    _chunk({}, "stop"),
    _chunk({}, usage={"prompt_tokens": 48, "completion_tokens": 20, "total_tokens": 68}),
    b"data: [DONE]\n\n",
]


def make_upstream(lib: Any, *, is_async: bool) -> Any:
    """A mock transport of `lib` (httpx or httpx2) answering like vLLM, without a network."""

    class Events(lib.SyncByteStream, lib.AsyncByteStream):  # type: ignore[misc,name-defined]
        def __iter__(self) -> Iterator[bytes]:
            yield from EVENTS

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for event in EVENTS:
                yield event

    def answer(request: Any) -> Any:
        if b'"stream":true' in request.content:
            headers = {"content-type": "text/event-stream"}
            return lib.Response(200, headers=headers, stream=Events())
        return lib.Response(200, headers={"content-type": "application/json"}, content=REPLY)

    if not is_async:
        return lib.MockTransport(answer)

    async def answer_async(request: Any) -> Any:
        return answer(request)

    return lib.MockTransport(answer_async)


def make_client(lib: Any, is_async: bool, log_dir: Path | None) -> Any:
    import openai
    from vllm_middleware import instrument

    upstream = make_upstream(lib, is_async=is_async)
    if is_async:
        http: Any = lib.AsyncClient(transport=upstream)
        sdk: Any = openai.AsyncOpenAI(base_url="http://vllm/v1", api_key="x", http_client=http)
    else:
        http = lib.Client(transport=upstream)
        sdk = openai.OpenAI(base_url="http://vllm/v1", api_key="x", http_client=http)
    return sdk if log_dir is None else instrument(sdk, log_dir=log_dir)


def run_sync(client: Any, n: int, stream: bool) -> float:
    create = client.chat.completions.create
    start = time.process_time()
    for _ in range(n):
        if stream:
            for _chunk in create(model=MODEL, messages=MESSAGES, stream=True):
                pass
        else:
            create(model=MODEL, messages=MESSAGES)
    return (time.process_time() - start) / n


async def run_async(client: Any, n: int, stream: bool) -> float:
    create = client.chat.completions.create
    start = time.process_time()
    for _ in range(n):
        if stream:
            async for _chunk in await create(model=MODEL, messages=MESSAGES, stream=True):
                pass
        else:
            await create(model=MODEL, messages=MESSAGES)
    return (time.process_time() - start) / n


def measure(lib: Any, is_async: bool, stream: bool, n: int, rounds: int, root: Path) -> list[Any]:
    bare_times: list[float] = []
    added: list[float] = []
    for round_no in range(rounds):
        per_mode: dict[str, float] = {}
        for mode in ("bare", "instrumented"):
            log_dir = None if mode == "bare" else root / f"{lib.__name__}-{round_no}"
            client = make_client(lib, is_async, log_dir)
            if is_async:

                async def both(c: Any = client) -> float:
                    await run_async(c, max(n // 10, 5), stream)  # warm-up
                    with quiet_gc():
                        cost = await run_async(c, n, stream)
                    await c.close()
                    return cost

                per_mode[mode] = asyncio.run(both())
            else:
                run_sync(client, max(n // 10, 5), stream)
                with quiet_gc():
                    per_mode[mode] = run_sync(client, n, stream)
                client.close()
        bare_times.append(per_mode["bare"])
        added.append(per_mode["instrumented"] - per_mode["bare"])
    bare = median(bare_times) * 1e6
    extra = median(added) * 1e6
    return [
        lib.__name__,
        "async" if is_async else "sync",
        "stream (24 events)" if stream else "JSON",
        f"{bare:.1f}",
        f"{bare + extra:.1f}",
        f"{extra:+.1f}",
    ]


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, rounds = (200, 2) if args.quick else (args.calls, args.rounds)
    banner("sdk_transport", args)
    libraries = []
    for name in ("httpx2", "httpx"):
        try:
            libraries.append(importlib.import_module(name))
        except ImportError:
            print(f"{name} not installed: skipped")
    root = Path(tempfile.mkdtemp(prefix="bench-sdk-"))
    rows = []
    try:
        for lib in libraries:
            for is_async in (False, True):
                for stream in (False, True):
                    rows.append(measure(lib, is_async, stream, n, rounds, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        "openai SDK: CPU per call, bare vs instrument() (mock upstream)",
        ["library", "client", "reply", "bare µs/call", "instrumented µs/call", "added µs"],
        rows,
    )
    print(f"{n} calls per run, median of {rounds} interleaved rounds; target: added <= 15 µs")


if __name__ == "__main__":
    main()
