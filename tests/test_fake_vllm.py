"""The fake vLLM server against the wire reference, using plain httpx (no middleware)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_middleware_testing import (
    QUEUE_FULL_MESSAGE,
    REASONING_TEXT,
    FakeVLLMServer,
    Flavor,
    count_tokens,
    default_chunker,
    fake_reply,
    fake_tool_arguments,
)

FLAVORS: list[Flavor] = ["v0.33", "v0.10.2"]
MODEL = "vllm:qwen-2.5-omni-7b"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}

CHAT_V033_TOP = {
    "id",
    "object",
    "created",
    "model",
    "choices",
    "service_tier",
    "system_fingerprint",
    "usage",
    "prompt_logprobs",
    "prompt_token_ids",
    "prompt_text",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
}
CHAT_V010_TOP = CHAT_V033_TOP - {"prompt_text", "ec_transfer_params", "metrics"}
CHOICE_V033 = {
    "index",
    "message",
    "logprobs",
    "finish_reason",
    "stop_reason",
    "token_ids",
    "routed_experts",
    "weight_versions",
}
MESSAGE_BASE = {"role", "content", "refusal", "annotations", "audio", "function_call"}
USAGE_KEYS = {
    "prompt_tokens",
    "total_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(params=FLAVORS)
def server(request: pytest.FixtureRequest) -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer(flavor=request.param) as fake:
        yield fake


@pytest.fixture
def client(server: FakeVLLMServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        yield http


def events_of(raw: str) -> list[str]:
    """Split an SSE body into events, checking vLLM's framing on the way."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") or event == ": keep-alive", event
        assert "\n" not in event
    return events


def data_events(raw: str) -> list[Any]:
    """Parsed ``data:`` payloads, with keep-alive comments skipped and the [DONE] marker last."""
    events = [e for e in events_of(raw) if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def stream(http: httpx.Client, path: str, body: dict[str, Any]) -> str:
    response = http.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    return response.text


def has_null_anywhere(obj: Any) -> bool:
    if obj is None:
        return True
    if isinstance(obj, dict):
        return any(has_null_anywhere(value) for value in obj.values())
    if isinstance(obj, list):
        return any(has_null_anywhere(value) for value in obj)
    return False


# Helpers of the public API -------------------------------------------------------------------


def test_fake_reply_and_tokens() -> None:
    assert count_tokens("  a b\tc\n") == 3
    assert fake_reply("hello world").content == "Echo: hello world"
    assert fake_reply("hello world", index=2).content == "Echo#2: hello world"
    cut = fake_reply("one two three", max_tokens=2)
    assert (cut.content, cut.finish_reason, cut.completion_tokens) == ("Echo: one", "length", 2)
    exact = fake_reply("one", max_tokens=2)
    assert (exact.content, exact.finish_reason) == ("Echo: one", "stop")
    thinking = fake_reply("x", max_tokens=3, reasoning=True)
    assert thinking.reasoning == " ".join(REASONING_TEXT.split()[:3])
    assert (thinking.content, thinking.finish_reason) == ("", "length")
    assert default_chunker(" a  b ") == [" a", "  b "]
    assert fake_tool_arguments(WEATHER_TOOL, "Weather in Zürich?") == (
        '{"city": "Zürich", "unit": "c"}'
    )


# Plain endpoints -----------------------------------------------------------------------------


def test_health_version_models(server: FakeVLLMServer, client: httpx.Client) -> None:
    health = client.get(server.url + "/health")
    assert health.status_code == 200
    assert health.content == b""
    version = client.get(server.url + "/version").json()
    assert version == {"version": "0.33.0" if server.flavor == "v0.33" else "0.10.2"}
    models = client.get("/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == MODEL
    assert card["max_model_len"] == 32768
    assert card["object"] == "model"
    assert card["owned_by"] == "vllm"
    assert card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission"
    assert client.get("/nope").status_code == 404
    assert client.get("/chat/completions").status_code == 405


# Non-streaming bodies ------------------------------------------------------------------------


def test_chat_body_keys_per_flavour(server: FakeVLLMServer, client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Describe"},
                {"type": "text", "text": "this picture"},
            ],
        },
    ]
    response = client.post("/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    new = server.flavor == "v0.33"
    assert set(body) == (CHAT_V033_TOP if new else CHAT_V010_TOP)
    (choice,) = body["choices"]
    old_choice = CHOICE_V033 - {"routed_experts", "weight_versions"}
    assert set(choice) == (CHOICE_V033 if new else old_choice)
    message = choice["message"]
    extra = {"reasoning"} if new else {"tool_calls", "reasoning_content"}
    expected_message = MESSAGE_BASE | extra
    assert set(message) == expected_message
    if not new:
        assert message["tool_calls"] == []
    assert message["content"] == "Echo: Describe this picture"
    assert choice["finish_reason"] == "stop"
    assert set(body["usage"]) == USAGE_KEYS
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == 9
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["service_tier"] is None
    if new:
        assert re.fullmatch(r"vllm-0\.33\.0-[0-9a-f]{8}", body["system_fingerprint"])
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", body["id"])
    else:
        assert body["system_fingerprint"] is None
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    # Compact JSON, as Starlette writes it.
    assert b'": ' not in response.content


def test_completion_body_keys_per_flavour(server: FakeVLLMServer, client: httpx.Client) -> None:
    body = client.post("/completions", json={"model": MODEL, "prompt": "The capital"}).json()
    new = server.flavor == "v0.33"
    top = {
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "kv_transfer_params",
    }
    assert set(body) == (top | {"ec_transfer_params", "metrics"} if new else top)
    (choice,) = body["choices"]
    keys = {
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
    }
    assert set(choice) == (keys | {"routed_experts", "weight_versions"} if new else keys)
    assert choice["text"] == "Echo: The capital"
    assert body["object"] == "text_completion"
    assert re.fullmatch(rf"cmpl-[0-9a-f]{{{16 if new else 32}}}", body["id"])
    assert body["usage"]["prompt_tokens"] == 2
    assert body["usage"]["completion_tokens"] == 3


def test_completion_defaults_to_16_tokens_and_prompt_lists(client: httpx.Client) -> None:
    long_prompt = " ".join(f"w{i}" for i in range(30))
    body = client.post("/completions", json={"prompt": long_prompt}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == fake_reply(long_prompt, max_tokens=16).content
    assert body["usage"]["completion_tokens"] == 16
    many = client.post("/completions", json={"prompt": ["a", "b c"], "n": 2}).json()
    texts = {c["index"]: c["text"] for c in many["choices"]}
    assert texts == {0: "Echo: a", 1: "Echo#1: a", 2: "Echo: b c", 3: "Echo#1: b c"}
    assert many["usage"]["prompt_tokens"] == 3
    ids = client.post("/completions", json={"prompt": [1, 2, 3]}).json()
    assert ids["usage"]["prompt_tokens"] == 3
    assert ids["choices"][0]["text"] == "Echo: 1 2 3"


def test_request_id_precedence(server: FakeVLLMServer, client: httpx.Client) -> None:
    body = {"messages": user("hi"), "request_id": "job-1"}
    assert client.post("/chat/completions", json=body).json()["id"] == "chatcmpl-job-1"
    both = client.post("/chat/completions", json=body, headers={"X-Request-Id": "hdr-9"})
    assert both.json()["id"] == "chatcmpl-hdr-9"
    completion = client.post("/completions", json={"prompt": "x", "request_id": "r"}).json()
    assert completion["id"] == "cmpl-r"


def test_max_tokens_cut_and_n(client: httpx.Client) -> None:
    text = "one two three four five"
    body = client.post(
        "/chat/completions", json={"messages": user(text), "max_completion_tokens": 3, "n": 3}
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice in body["choices"]:
        expected = fake_reply(text, index=choice["index"], max_tokens=3)
        assert choice["message"]["content"] == expected.content
        assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 9
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["total_tokens"] == 14


def test_reasoning_field_per_flavour(server: FakeVLLMServer, client: httpx.Client) -> None:
    server.reasoning = True
    body = client.post("/chat/completions", json={"messages": user("why")}).json()
    message = body["choices"][0]["message"]
    expected = fake_reply("why", reasoning=True)
    if server.flavor == "v0.33":
        assert message["reasoning"] == REASONING_TEXT
        assert "reasoning_content" not in message
        assert body["usage"]["completion_tokens_details"] == {
            "reasoning_tokens": count_tokens(REASONING_TEXT)
        }
    else:
        assert message["reasoning_content"] == REASONING_TEXT
        assert "reasoning" not in message
    assert message["content"] == expected.content
    assert body["usage"]["completion_tokens"] == expected.completion_tokens


def test_tool_call_body(server: FakeVLLMServer, client: httpx.Client) -> None:
    body = client.post(
        "/chat/completions",
        json={"messages": user("What is the weather in Zürich?"), "tools": [WEATHER_TOOL]},
    ).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function"
    assert re.fullmatch(
        rf"chatcmpl-tool-[0-9a-f]{{{16 if server.flavor == 'v0.33' else 32}}}", call["id"]
    )
    arguments = '{"city": "Zürich", "unit": "c"}'
    assert call["function"] == {"name": "get_weather", "arguments": arguments}
    no_tool = client.post(
        "/chat/completions", json={"messages": user("hello"), "tools": [WEATHER_TOOL]}
    ).json()
    assert no_tool["choices"][0]["finish_reason"] == "stop"
    if server.flavor == "v0.33":
        assert "tool_calls" not in no_tool["choices"][0]["message"]
    else:
        assert no_tool["choices"][0]["message"]["tool_calls"] == []


def test_tool_choice_variants(client: httpx.Client) -> None:
    tools = [WEATHER_TOOL, TIME_TOOL]

    def call(messages: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any]:
        body = {"messages": messages, "tools": tools, "tool_choice": tool_choice}
        response = client.post("/chat/completions", json=body)
        assert response.status_code == 200, response.text
        message: dict[str, Any] = response.json()["choices"][0]["message"]
        return message

    assert call(user("weather?"), "none")["content"] == "Echo: weather?"
    assert call(user("hi"), "required")["tool_calls"][0]["function"]["name"] == "get_weather"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert call(user("hi"), named)["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": "{}",
    }
    after_tool = [
        *user("weather in Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "x", "content": "sunny"},
    ]
    assert call(after_tool, "auto")["content"] == "Echo: weather in Oslo?"


# Errors --------------------------------------------------------------------------------------


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]  # type: ignore[no-any-return]


def test_unknown_model(server: FakeVLLMServer, client: httpx.Client) -> None:
    for path, extra in (
        ("/chat/completions", {"messages": user("x")}),
        ("/completions", {"prompt": "x"}),
    ):
        error = error_of(client.post(path, json={"model": "foo", **extra}), 404)
        assert error["type"] == "NotFoundError"
        if server.flavor == "v0.33":
            assert error["message"] == f"The model `foo` does not exist. Valid aliases: {MODEL}."
            assert error["param"] == "model"
        else:
            assert error["message"] == "The model `foo` does not exist."
            assert error["param"] is None


def test_max_tokens_limits(server: FakeVLLMServer, client: httpx.Client) -> None:
    server.max_model_len = 100
    too_big = client.post("/chat/completions", json={"messages": user("x"), "max_tokens": 101})
    error = error_of(too_big, 400)
    assert error["type"] == "BadRequestError"
    overflow = client.post("/chat/completions", json={"messages": user("a b c"), "max_tokens": 99})
    if server.flavor == "v0.33":
        assert error["param"] == "max_tokens"
        prefix = "max_tokens=101 cannot be greater than max_model_len=100."
        assert error["message"].startswith(prefix)
        assert overflow.status_code == 200  # v0.33 clamps to the room left
        assert overflow.json()["usage"]["completion_tokens"] == 4
    else:
        assert "is too large: 101" in error["message"]
        assert "is too large: 99" in error_of(overflow, 400)["message"]
    long_prompt = client.post("/chat/completions", json={"messages": user("w " * 101)})
    assert "maximum context length is 100" in error_of(long_prompt, 400)["message"]


def test_validation_errors(server: FakeVLLMServer, client: httpx.Client) -> None:
    not_json = client.post(
        "/chat/completions", content=b"{}", headers={"content-type": "text/plain"}
    )
    assert error_of(not_json, 400)["type"] == "Bad Request"
    broken = client.post(
        "/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert error_of(broken, 400)["type"] == "Bad Request"
    options = client.post(
        "/chat/completions",
        json={"messages": user("x"), "stream": False, "stream_options": {"include_usage": True}},
    )
    assert (
        "Stream options can only be defined when `stream=True`."
        in error_of(options, 400)["message"]
    )
    empty_tools = client.post("/chat/completions", json={"messages": user("x"), "tools": []})
    error_of(empty_tools, 400)
    unknown_named = client.post(
        "/chat/completions",
        json={
            "messages": user("x"),
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
    )
    error_of(unknown_named, 400)
    error_of(client.post("/chat/completions", json={"model": MODEL}), 400)
    error_of(
        client.post("/completions", json={"prompt": "x", "stream": True, "use_beam_search": True}),
        400,
    )
    auto_ok = client.post(
        "/chat/completions",
        json={"messages": user("x"), "tools": [WEATHER_TOOL], "tool_choice": "auto"},
    )
    assert auto_ok.status_code == 200


def test_flat_error_shape() -> None:
    with FakeVLLMServer(flavor="v0.10.2", error_shape="flat") as fake, httpx.Client() as http:
        response = http.post(
            fake.base_url + "/chat/completions", json={"model": "foo", "messages": user("x")}
        )
        assert response.status_code == 404
        assert response.json() == {
            "object": "error",
            "message": "The model `foo` does not exist.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
        triggered = http.post(fake.base_url + "/completions", json={"prompt": "[[status:503]]"})
        assert triggered.json()["object"] == "error"
        assert triggered.json()["code"] == 503


def test_api_key(server: FakeVLLMServer, client: httpx.Client) -> None:
    server.api_key = "sk-test"
    body = {"messages": user("x")}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
        response = client.post("/chat/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json() == {"error": "Unauthorized"}
    assert client.get("/models").status_code == 401
    assert client.get(server.url + "/health").status_code == 200
    good = client.post("/chat/completions", json=body, headers={"Authorization": "Bearer sk-test"})
    assert good.status_code == 200


@pytest.mark.parametrize(
    ("status", "err_type"),
    [
        (400, "BadRequestError"),
        (404, "NotFoundError"),
        (429, "TooManyRequestsError"),
        (500, "InternalServerError"),
        (501, "NotImplementedError"),
        (502, "BadGatewayError"),
        (503, "Service Unavailable"),
    ],
)
def test_status_triggers(client: httpx.Client, status: int, err_type: str) -> None:
    for is_stream in (False, True):
        response = client.post(
            "/chat/completions",
            json={"messages": user(f"please [[status:{status}]]"), "stream": is_stream},
        )
        error = error_of(response, status)
        assert error["type"] == err_type
        if status == 503:
            assert error["message"] == QUEUE_FULL_MESSAGE


def test_status_401_trigger(client: httpx.Client) -> None:
    response = client.post("/completions", json={"prompt": "[[status:401]]"})
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized"}


# Streaming -----------------------------------------------------------------------------------


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


def test_keepalive_comments(client: httpx.Client, server: FakeVLLMServer) -> None:
    server.keepalive_interval = 0.05
    server.token_delay = 0.06
    raw = stream(client, "/chat/completions", {"messages": user("a b")})
    events = events_of(raw)
    assert events.count(": keep-alive") >= 3
    assert events[0].startswith("data: ")  # the first token came without a pause
    chunks = data_events(raw)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Echo: a b"


def test_midstream_error(server: FakeVLLMServer, client: httpx.Client) -> None:
    text = "one two three four [[midstream_error]]"
    raw = stream(client, "/chat/completions", {"messages": user(text)})
    events = events_of(raw)
    assert events[-1] == "data: [DONE]"
    if server.flavor == "v0.33":
        assert events[-2] == (
            'data: {"error":{"message":"Internal server error",'
            '"type":"InternalServerError","param":null,"code":500}}'
        )
    else:
        assert events[-2].startswith('data: {"error": {"message": ')
        assert events[-2].endswith('"type": "BadRequestError", "param": null, "code": 400}}')
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert contents and all(contents)
    assert "".join(contents) != fake_reply(text).content
    plain = client.post("/chat/completions", json={"messages": user(text)})
    assert plain.status_code == (500 if server.flavor == "v0.33" else 400)


def test_drop(client: httpx.Client) -> None:
    seen: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream(
            "POST", "/chat/completions", json={"messages": user("a b c d [[drop]]"), "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        seen.extend(response.iter_lines())
    assert any(line.startswith("data: {") for line in seen)
    assert "data: [DONE]" not in seen
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/chat/completions", json={"messages": user("[[drop]]")})
    assert client.post("/chat/completions", json={"messages": user("ok")}).status_code == 200


def first_content_after(http: httpx.Client, body: dict[str, Any]) -> float:
    started = time.monotonic()
    with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if '"content":"E' in line:
                return time.monotonic() - started
    raise AssertionError("no content")


def test_slow_first_token(server: FakeVLLMServer, client: httpx.Client) -> None:
    assert first_content_after(client, {"messages": user("[[slow:0.3]]")}) >= 0.3
    server.first_token_delay = 0.2
    assert first_content_after(client, {"messages": user("fast")}) >= 0.2
    started = time.monotonic()
    client.post("/chat/completions", json={"messages": user("x [[slow:0.2]]")})
    assert time.monotonic() - started >= 0.2


def test_hang_times_out_and_stop_is_prompt() -> None:
    fake = FakeVLLMServer().start()
    with (
        httpx.Client(base_url=fake.base_url, timeout=0.3) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/chat/completions", json={"messages": user("[[hang]]")})
    stuck = socket.create_connection(("127.0.0.1", fake.port))
    body = json.dumps({"messages": user("[[hang]]"), "stream": True}).encode()
    stuck.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    time.sleep(0.1)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2
    stuck.settimeout(2)
    assert stuck.recv(100) == b""  # the hung connection was closed by stop()
    stuck.close()
    assert fake.active_connections == 0


def test_restart_on_same_port() -> None:
    fake = FakeVLLMServer().start()
    port = fake.port
    fake.stop()
    with httpx.Client() as http:
        with pytest.raises(httpx.ConnectError):
            http.get(f"http://127.0.0.1:{port}/health")
        fake.start()
        assert fake.port == port
        assert http.get(fake.url + "/health").status_code == 200
    fake.stop()


def test_client_abort_is_counted(server: FakeVLLMServer) -> None:
    server.token_delay = 0.05
    with (
        httpx.Client(base_url=server.base_url) as http,
        http.stream(
            "POST",
            "/chat/completions",
            json={"messages": user(" ".join(["w"] * 50)), "stream": True},
        ) as response,
    ):
        next(response.iter_lines())
    deadline = time.monotonic() + 5
    while server.aborted_streams == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.aborted_streams == 1


def test_requests_are_recorded_with_extras(server: FakeVLLMServer, client: httpx.Client) -> None:
    body = {
        "messages": user("x"),
        "top_k": 20,
        "guided_json": {"type": "object"},
        "chat_template_kwargs": {"enable_thinking": False},
        "vllm_xargs": {"a": 1},
    }
    assert client.post("/chat/completions", json=body, headers={"X-Trace": "t1"}).status_code == 200
    assert server.request_count == 1
    (recorded,) = server.requests
    assert recorded.method == "POST"
    assert recorded.path == "/v1/chat/completions"
    assert recorded.body == body
    assert recorded.headers["x-trace"] == "t1"
    assert json.loads(recorded.raw_body) == body
    server.clear_requests()
    assert server.request_count == 0


async def test_many_concurrent_requests() -> None:
    with FakeVLLMServer(token_delay=0.001) as fake:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)

        async def one(http: httpx.AsyncClient, i: int) -> None:
            text = f"request number {i}"
            if i % 2:
                async with http.stream(
                    "POST",
                    "/chat/completions",
                    json={
                        "messages": user(text),
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                ) as response:
                    assert response.status_code == 200
                    raw = (await response.aread()).decode()
                chunks = data_events(raw)
                content = "".join(
                    c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
                )
                assert content == fake_reply(text).content
            else:
                response = await http.post("/chat/completions", json={"messages": user(text)})
                assert response.json()["choices"][0]["message"]["content"] == (
                    fake_reply(text).content
                )

        # Many small pools: httpx's per-request cost grows with the pool size, not the server's.
        clients = [
            httpx.AsyncClient(base_url=fake.base_url, limits=limits, timeout=60) for _ in range(10)
        ]
        try:
            await asyncio.gather(*(one(clients[i % 10], i) for i in range(1000)))
        finally:
            await asyncio.gather(*(http.aclose() for http in clients))
        assert fake.request_count == 1000
        assert fake.aborted_streams == 0
        assert fake.peak_connections > 100
