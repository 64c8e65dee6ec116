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

import argparse
import asyncio
import importlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
from _common import banner, base_parser, callgrind_total, median, print_table, quiet_gc

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


BODY = orjson.dumps({"model": MODEL, "messages": MESSAGES})
STREAM_BODY = orjson.dumps({"model": MODEL, "messages": MESSAGES, "stream": True})
JSON_HEADERS = {"content-type": "application/json"}


def make_sdk(lib: Any, is_async: bool, log_dir: Path | None) -> Any:
    """An openai SDK client on a `lib` HTTP client with the mock upstream; instrumented when
    `log_dir` is given."""
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


def make_http(lib: Any, is_async: bool, log_dir: Path | None) -> Any:
    """A bare `lib` client on the mock upstream, or one with a capture transport around it."""
    capture = importlib.import_module(
        "vllm_middleware.httpx2" if lib.__name__ == "httpx2" else "vllm_middleware"
    )
    transport = make_upstream(lib, is_async=is_async)
    if log_dir is not None:
        wrapper = capture.AsyncCaptureTransport if is_async else capture.CaptureTransport
        transport = wrapper(transport, log_dir=log_dir)
    factory = lib.AsyncClient if is_async else lib.Client
    return factory(transport=transport, base_url="http://vllm/v1")


def sdk_call_sync(client: Any, stream: bool) -> None:
    create = client.chat.completions.create
    if stream:
        for _chunk in create(model=MODEL, messages=MESSAGES, stream=True):
            pass
    else:
        create(model=MODEL, messages=MESSAGES)


async def sdk_call_async(client: Any, stream: bool) -> None:
    create = client.chat.completions.create
    if stream:
        async for _chunk in await create(model=MODEL, messages=MESSAGES, stream=True):
            pass
    else:
        await create(model=MODEL, messages=MESSAGES)


def http_call_sync(client: Any, stream: bool) -> None:
    body = STREAM_BODY if stream else BODY
    with client.stream("POST", "/chat/completions", content=body, headers=JSON_HEADERS) as r:
        for _chunk in r.iter_bytes():
            pass


async def http_call_async(client: Any, stream: bool) -> None:
    body = STREAM_BODY if stream else BODY
    async with client.stream(
        "POST", "/chat/completions", content=body, headers=JSON_HEADERS
    ) as response:
        async for _chunk in response.aiter_bytes():
            pass


def cpu_per_call_sync(client: Any, call: Any, n: int, stream: bool) -> float:
    for _ in range(max(n // 10, 5)):  # warm-up
        call(client, stream)
    with quiet_gc():
        start = time.process_time()
        for _ in range(n):
            call(client, stream)
        return (time.process_time() - start) / n


async def cpu_per_call_async(client: Any, call: Any, n: int, stream: bool) -> float:
    for _ in range(max(n // 10, 5)):
        await call(client, stream)
    with quiet_gc():
        start = time.process_time()
        for _ in range(n):
            await call(client, stream)
        return (time.process_time() - start) / n


def one_run(
    kind: str, lib: Any, is_async: bool, stream: bool, n: int, log_dir: Path | None
) -> float:
    make = make_sdk if kind == "SDK" else make_http
    client = make(lib, is_async, log_dir)
    if is_async:
        call = sdk_call_async if kind == "SDK" else http_call_async

        async def run() -> float:
            cost = await cpu_per_call_async(client, call, n, stream)
            close = client.close if kind == "SDK" else client.aclose
            await close()
            return cost

        return asyncio.run(run())
    call = sdk_call_sync if kind == "SDK" else http_call_sync
    cost = cpu_per_call_sync(client, call, n, stream)
    client.close()
    return cost


def measure(
    kind: str, lib: Any, is_async: bool, stream: bool, n: int, rounds: int, root: Path
) -> list[Any]:
    bare_times: list[float] = []
    added: list[float] = []
    for round_no in range(rounds):
        log_dir = root / f"{kind}-{lib.__name__}-{is_async}-{stream}-{round_no}"
        bare = one_run(kind, lib, is_async, stream, n, None)
        captured = one_run(kind, lib, is_async, stream, n, log_dir)
        bare_times.append(bare)
        added.append(captured - bare)
    base = median(bare_times) * 1e6
    extra = median(added) * 1e6
    return [
        kind,
        lib.__name__,
        "async" if is_async else "sync",
        "stream (24 events)" if stream else "JSON",
        f"{base:.1f}",
        f"{base + extra:.1f}",
        f"{extra:+.1f}",
    ]


def child(spec: list[str]) -> None:
    """`--child KIND LIB ASYNC STREAM CAPTURED N`: N calls, for callgrind to count."""
    kind, lib_name, is_async, stream, captured, n = spec
    lib = importlib.import_module(lib_name)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-sdk-cg-")) if captured == "1" else None
    one_run(kind, lib, is_async == "1", stream == "1", int(n), log_dir)


def instructions(spec: list[str], scratch: Path) -> int:
    out = scratch / f"callgrind.{len(list(scratch.iterdir()))}"
    return callgrind_total(Path(__file__).resolve(), spec, out)


def calls(n: int) -> int:
    """Calls a run of `n` makes: its warm-up too (`cpu_per_call_sync`)."""
    return n + max(n // 10, 5)


def instruction_rows(libraries: list[Any], few: int, many: int) -> list[list[Any]]:
    """Instructions per call (the difference of a run of `many` calls and one of `few`, so
    imports and start-up cancel out), bare and captured: independent of the machine's load."""
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-sdk-cg-"))
    try:
        # Sync clients only: under valgrind each run takes minutes, and the capture's work is
        # the same code in both (the clock table has async too).
        configs = [("HTTP client", lib, "0") for lib in libraries]
        configs += [("SDK", lib, "0") for lib in libraries[:1]]
        for kind, lib, is_async in configs:
            per_call = {}
            for captured in ("0", "1"):
                spec = [kind, lib.__name__, is_async, "0", captured]
                runs = [instructions([*spec, str(n)], scratch) for n in (few, many)]
                per_call[captured] = (runs[1] - runs[0]) / (calls(many) - calls(few))
            bare, added = per_call["0"], per_call["1"] - per_call["0"]
            rows.append(
                [kind, lib.__name__, "async" if is_async == "1" else "sync", "JSON",
                 f"{bare / 1000:.0f}k", f"{added / 1000:+.1f}k", f"{added / bare:+.1%}"]
            )  # fmt: skip
            print("  done:", *rows[-1][:3], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def main() -> None:
    parser = base_parser(__doc__ or "")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under callgrind"
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    n, rounds = (200, 2) if args.quick else (args.calls, args.rounds)
    banner("sdk_transport", args)
    libraries = []
    for name in ("httpx2", "httpx"):
        try:
            libraries.append(importlib.import_module(name))
        except ImportError:
            print(f"{name} not installed: skipped")
    if args.instructions:
        few, many = (20, 60) if args.quick else (100, 400)
        print_table(
            "capture transport: instructions per call (callgrind), bare vs captured",
            ["calls through", "library", "client", "reply", "bare", "added", "added %"],
            instruction_rows(libraries, few, many),
        )
        print(f"(instructions of {many} calls - those of {few}) / {many - few}")
        return
    root = Path(tempfile.mkdtemp(prefix="bench-sdk-"))
    rows = []
    try:
        for kind in ("HTTP client", "SDK"):
            for lib in libraries:
                for is_async in (False, True):
                    for stream in (False, True):
                        rows.append(measure(kind, lib, is_async, stream, n, rounds, root))
                        print("  done:", *rows[-1][:4], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        "capture transport: CPU per call, bare vs captured (mock upstream)",
        ["calls through", "library", "client", "reply", "bare µs", "captured µs", "added µs"],
        rows,
    )
    print(
        f"{n} calls per run, median of {rounds} rounds (bare and captured runs interleaved);"
        " target: added <= 15 µs per call"
    )


if __name__ == "__main__":
    main()
