"""The fake's v0.33 details read from vLLM 0.33's serving code (issue 12): forced tool calls,
the finish chunk's last token, fingerprints, continuous usage, token-level extras, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from vllm_middleware_testing import FakeVLLMServer, fake_reply
from vllm_middleware_testing._fake_tokens import token_ids

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
TEXT = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer(reasoning=False) as fake:
        yield fake


def post(server: FakeVLLMServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/{path}", json=body, timeout=10)


def chunks(server: FakeVLLMServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    text = post(server, path, {**body, "stream": True}).text
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def chat(text: str = TEXT) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_call(server: FakeVLLMServer, choice: str) -> None:
    tool_choice: Any = NAMED if choice == "named" else "required"
    body = {"messages": chat(), "tools": [TOOL], "tool_choice": tool_choice}
    message = post(server, "chat/completions", body).json()["choices"][0]
    finish = "stop" if choice == "named" else "tool_calls"  # resolve_finish_reason
    assert message["finish_reason"] == finish
    assert message["message"]["content"] == ""
    stream = chunks(server, "chat/completions", body)
    deltas = [c["choices"][0]["delta"] for c in stream[1:-1]]
    assert all("content" not in d for d in deltas)
    first = deltas[0]["tool_calls"][0]
    assert set(first) == {"id", "type", "index", "function"}
    assert first["function"]["name"] == "get_weather" and first["function"]["arguments"]
    later = [d["tool_calls"][0]["function"] for d in deltas[1:]]
    assert all(("name" in f) == (choice == "required") for f in later)
    assert stream[-1]["choices"][0]["finish_reason"] == finish


def test_parser_tool_call_keeps_null_content(server: FakeVLLMServer) -> None:
    body = {"messages": chat(), "tools": [TOOL]}
    answer = post(server, "chat/completions", body).json()["choices"][0]
    assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
    deltas = [c["choices"][0]["delta"] for c in chunks(server, "chat/completions", body)[1:-1]]
    assert all(d["content"] is None for d in deltas)
    assert set(deltas[0]["tool_calls"][0]["function"]) == {"name"}


def test_finish_chunk_carries_the_last_token(server: FakeVLLMServer) -> None:
    cut = chunks(
        server, "chat/completions", {"messages": chat("one two three four"), "max_tokens": 3}
    )
    assert cut[-1]["choices"][0]["finish_reason"] == "length"
    assert cut[-1]["choices"][0]["delta"] == {"content": " two"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in cut)
    assert text == fake_reply("one two three four", max_tokens=3).content
    eos = chunks(server, "chat/completions", {"messages": chat("hi")})
    assert eos[-1]["choices"][0]["delta"] == {"content": ""}


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_fingerprint_on_the_terminal_chunk_without_include_usage(
    server: FakeVLLMServer, path: str
) -> None:
    body = {"messages": chat()} if path.startswith("chat") else {"prompt": TEXT}
    plain = chunks(server, path, body)
    assert [("system_fingerprint" in c) for c in plain] == [False] * (len(plain) - 1) + [True]
    usage = chunks(server, path, {**body, "stream_options": {"include_usage": True}})
    assert [("system_fingerprint" in c) for c in usage][-2:] == [False, True]
    assert usage[-1]["choices"] == []


def test_continuous_usage_details() -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    with FakeVLLMServer(reasoning=True) as fake:
        text = chunks(fake, "completions", {"prompt": TEXT, "stream_options": options})
        assert all("completion_tokens_details" not in c["usage"] for c in text[:-1])
        reasoning = chunks(
            fake, "chat/completions", {"messages": chat(), "stream_options": options}
        )
    details = [c["usage"]["completion_tokens_details"] for c in reasoning[:-1]]
    assert details[0] == {"reasoning_tokens": 0}
    assert details[-1] == {"reasoning_tokens": 6}  # "Let me think about this request."
    assert reasoning[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 6}


def test_token_level_extras(server: FakeVLLMServer) -> None:
    body = {
        "messages": chat("hello there"),
        "logprobs": True,
        "top_logprobs": 2,
        "return_token_ids": True,
        "return_prompt_text": True,
        "prompt_logprobs": 1,
        "kv_transfer_params": {"do_remote_decode": True},
        "stop_token_ids": [9],
    }
    answer = post(server, "chat/completions", body).json()
    choice = answer["choices"][0]
    content = choice["message"]["content"]
    assert choice["token_ids"] == token_ids(content)
    entries = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == content
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    assert choice["stop_reason"] == 9
    assert answer["prompt_token_ids"] == token_ids("hello there")
    assert answer["prompt_text"].startswith("<|user|>hello there")
    assert answer["prompt_logprobs"][0] is None and len(answer["prompt_logprobs"]) == 2
    assert answer["kv_transfer_params"]["do_remote_prefill"] is True


def test_stop_string_and_completions_echo(server: FakeVLLMServer) -> None:
    stopped = post(server, "completions", {"prompt": "one two three", "stop": " two"}).json()
    assert stopped["choices"][0]["text"] == "Echo: one"
    assert stopped["choices"][0]["stop_reason"] == " two"
    echoed = post(server, "completions", {"prompt": "one two", "echo": True}).json()
    assert echoed["choices"][0]["text"] == "one two" + fake_reply("one two").content


@pytest.mark.parametrize(
    ("body", "param", "ending"),
    [
        ({"tools": []}, "tools", "(parameter=tools)"),
        ({"tool_choice": "auto"}, "tool_choice", "(parameter=tool_choice)"),
        (
            {"stream_options": {"include_usage": True}},
            "stream_options",
            "(parameter=stream_options)",
        ),
        (
            {"logprobs": True, "top_logprobs": -2},
            "top_logprobs",
            "(parameter=top_logprobs, value=-2)",
        ),
        ({"n": 0}, None, "n must be at least 1, got 0."),
    ],
)
def test_bad_request_errors(
    server: FakeVLLMServer, body: dict[str, Any], param: str | None, ending: str
) -> None:
    answer = post(server, "chat/completions", {"messages": chat("hi"), **body})
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["code"] == 400
    assert error["type"] == "BadRequestError" and error["param"] == param
    assert error["message"].endswith(ending)


def test_empty_prompt_names_the_parameter(server: FakeVLLMServer) -> None:
    error = post(server, "completions", {"prompt": ""}).json()["error"]
    assert (error["type"], error["param"]) == ("BadRequestError", "prompt")
