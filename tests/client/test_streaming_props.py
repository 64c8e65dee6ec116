"""Property: however the server chunks the same output, the caller and the record agree."""

from __future__ import annotations

import asyncio
import itertools
import random
import tempfile
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware._reassembly import SSEDecoder
from vllm_middleware_testing import FakeVLLMServer

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def random_chunker(seed: int, max_piece: int) -> Callable[[str], list[str]]:
    def chunk(text: str) -> list[str]:
        # Seeded by the text too, so the same text is split the same way in every request.
        rng = random.Random(f"{seed}:{text}")
        pieces, position = [], 0
        while position < len(text):
            step = rng.randint(1, max_piece)
            pieces.append(text[position : position + step])
            position += step
        return pieces

    return chunk


async def scenario(server: FakeVLLMServer, text: str, n: int, tools: bool, flavor: str) -> None:
    server.flavor = flavor  # type: ignore[assignment]
    params: dict[str, Any] = {"n": n}
    if tools:
        params["tools"] = [TOOL]
    messages = [{"role": "user", "content": text}]
    with tempfile.TemporaryDirectory() as log_dir:
        client = VLLMMiddleware(server.base_url, log_dir=log_dir, redis_url="")
        received = []
        async with await client.chat_completion(messages, stream=True, **params) as stream:
            async for chunk in stream:
                received.append(chunk)
        plain = await client.chat_completion(messages, **params)
        await client.close()
        records = {r["stream"]: r for r in load_logs(log_dir)}
    record = records[True]
    assert record["stream_end"] == "completed"
    assert record["chunks"] == len(received) + 1  # + the hidden usage chunk
    for mine, theirs in zip(record["response"]["choices"], plain["choices"], strict=True):
        message, expected = mine["message"], theirs["message"]
        assert message["content"] == expected["content"]
        assert mine["finish_reason"] == theirs["finish_reason"]
        calls = [c["function"] for c in message.get("tool_calls", [])]
        assert calls == [c["function"] for c in expected.get("tool_calls") or []]
        # The caller's deltas concatenate to the same text.
        streamed = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in received
            if c["choices"][0]["index"] == mine["index"]
        )
        assert streamed == (expected["content"] or "")
    usage = record["usage"]
    assert usage["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert usage["total_tokens"] == plain["usage"]["total_tokens"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 10_000),
    max_piece=st.integers(1, 12),
    words=st.lists(st.sampled_from(["héllo", "weather", "in", "Zürich", "a", "b\n"]), max_size=6),
    n=st.integers(1, 3),
    tools=st.booleans(),
    flavor=st.sampled_from(["v0.33", "v0.10.2"]),
)
def test_random_chunkings(
    seed: int, max_piece: int, words: list[str], n: int, tools: bool, flavor: str
) -> None:
    with FakeVLLMServer(chunker=random_chunker(seed, max_piece)) as server:
        asyncio.run(scenario(server, " ".join(words) or "x", n, tools, flavor))


def reference_events(body: bytes) -> list[bytes]:
    """The SSE specification's framing, written plainly: CRLF, LF and CR all end a line."""
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    events, data = [], []
    for line in text.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line == b"data":
            data.append(b"")
        elif not line and data:
            events.append(b"\n".join(data))
            data = []
    if data:  # the end of the body dispatches a pending event, as the client always did
        events.append(b"\n".join(data))
    return events


SSE_LINES = st.sampled_from(
    [
        b'data: {"a": 1}',
        b"data:x",
        b"data",
        b": keep-alive",
        b"event: message",
        b"id: 7",
        b"data: \xe2\x80\xa8 \xc2\x85 \xe2\x80\xa9",  # U+2028, U+0085, U+2029 are not line ends
        b"data: [DONE]",
        b"",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.tuples(SSE_LINES, st.sampled_from([b"\n", b"\r\n", b"\r"])), max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_sse_decoder_any_chunking(lines: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    body = b"".join(line + end for line, end in lines)
    bounds = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    decoder = SSEDecoder()
    events: list[bytes] = []
    for start, stop in itertools.pairwise(bounds):
        events += decoder.feed(body[start:stop])
    events += decoder.close()
    assert events == reference_events(body)
