"""Shared by the fake vLLM server's tests: the wire reference (keys per flavour), SSE helpers."""

from __future__ import annotations

import json
from typing import Any

import httpx
from vllm_middleware_testing import Flavor

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
