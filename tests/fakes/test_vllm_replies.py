"""The fake vLLM server's replies (no streaming) against the wire reference, per flavour."""

from __future__ import annotations

import re
from typing import Any

import httpx
from vllm_middleware_testing import (
    REASONING_TEXT,
    FakeVLLMServer,
    count_tokens,
    default_chunker,
    fake_reply,
    fake_tool_arguments,
)

from .vllm_support import (
    CHAT_V010_TOP,
    CHAT_V033_TOP,
    CHOICE_V033,
    MESSAGE_BASE,
    MODEL,
    TIME_TOOL,
    USAGE_KEYS,
    WEATHER_TOOL,
    user,
)

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
