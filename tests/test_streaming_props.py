"""Property: however the server chunks the same output, the caller and the record agree."""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware.testing import FakeVLLMServer

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
