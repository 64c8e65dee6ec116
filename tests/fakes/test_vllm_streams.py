"""The fake vLLM server's streams: SSE framing, usage chunks, tool calls, random chunking."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_middleware_testing import (
    REASONING_TEXT,
    FakeVLLMServer,
    count_tokens,
    fake_reply,
    fake_tool_arguments,
)

from .vllm_support import WEATHER_TOOL, data_events, has_null_anywhere, stream, user


def test_chat_stream_framing_and_nulls(server: FakeVLLMServer, client: httpx.Client) -> None:
    text = "tell me a story"
    raw = stream(client, "/chat/completions", {"messages": user(text)})
    chunks = data_events(raw)
    new = server.flavor == "v0.33"
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    role, *deltas, finish = chunks
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert ("prompt_text" in role) == new
    assert "prompt_token_ids" in role
    for chunk in deltas:
        (choice,) = chunk["choices"]
        assert choice["logprobs"] is None
        assert choice["finish_reason"] is None
        assert choice["token_ids"] is None
        assert ("kv_transfer_params" in chunk) == new
        assert "usage" not in chunk
    assert "".join(c["choices"][0]["delta"]["content"] for c in deltas) == fake_reply(text).content
    assert len(deltas) == count_tokens(fake_reply(text).content)
    finish_choice = finish["choices"][0]
    # The finish chunk carries the last token: EOS decodes to "" without a parser.
    assert finish_choice["delta"] == {"content": ""}
    assert finish_choice["finish_reason"] == "stop"
    assert finish_choice["stop_reason"] is None
    assert ("weight_versions" in finish_choice) == new
    # Without include_usage the terminal chunk carries the fingerprint (v0.33 only).
    assert ("system_fingerprint" in finish) == new


@pytest.mark.parametrize(
    "options",
    [None, {}, {"include_usage": True}, {"include_usage": False}, {"continuous_usage_stats": True}],
)
def test_usage_chunk_defaults(
    server: FakeVLLMServer, client: httpx.Client, options: dict[str, Any] | None
) -> None:
    body: dict[str, Any] = {"messages": user("a b")}
    if options is not None:
        body["stream_options"] = options
    chunks = data_events(stream(client, "/chat/completions", body))
    new = server.flavor == "v0.33"
    # No stream_options means no usage chunk; with it, the default flipped between versions.
    expected = options is not None and bool(options.get("include_usage", not new))
    usage_chunks = [c for c in chunks if c["choices"] == []]
    assert bool(usage_chunks) == expected
    if expected:
        assert chunks[-1] is usage_chunks[0]
        usage = chunks[-1]["usage"]
        assert usage == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}
        assert not has_null_anywhere(chunks[-1])
        assert ("system_fingerprint" in chunks[-1]) == new
        assert "system_fingerprint" not in chunks[-2]
    continuous = expected and bool(options and options.get("continuous_usage_stats"))
    with_choices = [c for c in chunks if c["choices"]]
    if continuous:
        counts = [c["usage"]["completion_tokens"] for c in with_choices]
        assert counts == [0, 1, 2, 3, 3]
        assert all(c["usage"]["completion_tokens_details"] is None for c in with_choices)
    else:
        assert all("usage" not in c for c in with_choices)


def test_continuous_usage_v033_needs_include_usage() -> None:
    with FakeVLLMServer() as fake, httpx.Client(base_url=fake.base_url) as http:
        chunks = data_events(
            stream(
                http,
                "/chat/completions",
                {
                    "messages": user("x"),
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                },
            )
        )
        assert all("usage" in c for c in chunks)


def test_completion_stream(server: FakeVLLMServer, client: httpx.Client) -> None:
    raw = stream(
        client,
        "/completions",
        {"prompt": "once upon", "n": 2, "stream_options": {"include_usage": True}},
    )
    chunks = data_events(raw)
    new = server.flavor == "v0.33"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all("delta" not in choice for c in chunks for choice in c["choices"])
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        assert set(choice) >= {
            "index",
            "text",
            "logprobs",
            "finish_reason",
            "stop_reason",
            "prompt_token_ids",
            "token_ids",
        }
        assert ("weight_versions" in choice) == new
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "Echo: once upon", 1: "Echo#1: once upon"}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_n_choices_interleave(client: httpx.Client) -> None:
    text = "alpha beta"
    chunks = data_events(stream(client, "/chat/completions", {"messages": user(text), "n": 3}))
    assert all(len(c["choices"]) == 1 for c in chunks)
    indices = [c["choices"][0]["index"] for c in chunks]
    assert indices[:3] == [0, 1, 2]
    assert all(c["choices"][0]["delta"].get("role") == "assistant" for c in chunks[:3])
    assert indices[3:6] == [0, 1, 2]  # interleaved, not one choice after the other
    for index in range(3):
        mine = [c["choices"][0] for c in chunks[3:] if c["choices"][0]["index"] == index]
        content = "".join(choice["delta"].get("content", "") for choice in mine)
        assert content == fake_reply(text, index=index).content
        assert mine[-1]["finish_reason"] == "stop"


def test_reasoning_stream(server: FakeVLLMServer, client: httpx.Client) -> None:
    server.reasoning = True
    chunks = data_events(stream(client, "/chat/completions", {"messages": user("q")}))
    key = "reasoning" if server.flavor == "v0.33" else "reasoning_content"
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert "".join(d.get(key, "") for d in deltas) == REASONING_TEXT
    assert "".join(d.get("content", "") for d in deltas) == "Echo: q"
    first_content = next(i for i, d in enumerate(deltas) if "content" in d)
    assert all(key in d for d in deltas[:first_content])


def tool_stream(http: httpx.Client, text: str = "weather in Paris?") -> list[Any]:
    return data_events(
        stream(http, "/chat/completions", {"messages": user(text), "tools": [WEATHER_TOOL]})
    )


def test_tool_call_stream(server: FakeVLLMServer, client: httpx.Client) -> None:
    chunks = tool_stream(client)
    new = server.flavor == "v0.33"
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    first = deltas[0]["tool_calls"]
    assert first == [
        {"id": first[0]["id"], "type": "function", "index": 0, "function": {"name": "get_weather"}}
    ]
    for delta in deltas:
        assert ("content" in delta) == new
        if new:
            assert delta["content"] is None
    for delta in deltas[1:]:
        (entry,) = delta["tool_calls"]
        assert set(entry) == {"index", "function"}
        assert set(entry["function"]) == {"arguments"}
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert arguments == fake_tool_arguments(WEATHER_TOOL, "weather in Paris?")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_name_and_arguments_in_one_chunk(client: httpx.Client, server: FakeVLLMServer) -> None:
    server.merge_tool_name_delta = True
    chunks = tool_stream(client)
    entries = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert len(entries) == 2
    assert entries[0]["index"] == entries[1]["index"] == 0
    assert entries[0]["function"] == {"name": "get_weather"}
    assert "arguments" in entries[1]["function"]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer() as fake:
        yield fake


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=12),
    city=st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=12),
    merge=st.booleans(),
)
def test_random_chunking_reassembles(
    shared_server: FakeVLLMServer, cuts: list[int], city: str, merge: bool
) -> None:
    def chunker(text: str) -> list[str]:
        positions = sorted({c for c in cuts if c < len(text)})
        bounds = [0, *positions, len(text)]
        return [text[a:b] for a, b in itertools.pairwise(bounds)]

    shared_server.chunker = chunker
    shared_server.merge_tool_name_delta = merge
    text = f"weather in {city}"
    with httpx.Client(base_url=shared_server.base_url) as http:
        plain = http.post(
            "/chat/completions", json={"messages": user(text), "tools": [WEATHER_TOOL]}
        ).json()
        expected = plain["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        chunks = tool_stream(http, text)
        fragments = [
            entry["function"].get("arguments", "")
            for c in chunks[1:-1]
            for entry in c["choices"][0]["delta"]["tool_calls"]
        ]
        assert "".join(fragments) == expected == fake_tool_arguments(WEATHER_TOOL, text)
        content_chunks = data_events(stream(http, "/chat/completions", {"messages": user(text)}))
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks)
        assert content == fake_reply(text).content
