"""The opt-in content attributes of an OTLP span (`--otlp-content`): the conversation as the
GenAI semantic conventions lay it out (`gen_ai.input.messages`, `gen_ai.output.messages`,
`gen_ai.system_instructions`, `gen_ai.tool.definitions`), each a JSON string."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["content_attrs"]


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append({"type": "text", "content": part["text"]})
        elif isinstance(part, dict) and part.get("type"):
            parts.append({"type": str(part["type"])})  # media: its kind, not its bytes
    return parts


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    role = str(message.get("role"))
    parts: list[dict[str, Any]] = _parts(message.get("content"))
    if role == "tool":
        parts = [
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": message.get("content"),
            }
        ]
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            parts.append(
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": call["function"].get("name"),
                    "arguments": call["function"].get("arguments"),
                }
            )
    return {"role": role, "parts": parts}


def content_attrs(record: Mapping[str, Any], attrs: dict[str, Any]) -> None:
    messages = record.get("messages")
    if isinstance(messages, list):
        ms = [m for m in messages if isinstance(m, dict)]
        system = [p for m in ms if m.get("role") == "system" for p in _parts(m.get("content"))]
        inputs = [_message(m) for m in ms if m.get("role") != "system"]
        if system:
            attrs["gen_ai.system_instructions"] = orjson.dumps(system).decode()
        attrs["gen_ai.input.messages"] = orjson.dumps(inputs).decode()
    elif isinstance(record.get("prompt"), str):
        prompt = [{"role": "user", "parts": _parts(record["prompt"])}]
        attrs["gen_ai.input.messages"] = orjson.dumps(prompt).decode()
    response = record.get("response")
    choices = response.get("choices") if isinstance(response, dict) else None
    if isinstance(choices, list):
        outputs = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            item: dict[str, Any] = (
                _message(message)
                if isinstance(message, dict)
                else {"role": "assistant", "parts": _parts(choice.get("text"))}
            )
            item["finish_reason"] = choice.get("finish_reason")
            outputs.append(item)
        attrs["gen_ai.output.messages"] = orjson.dumps(outputs).decode()
    params = record.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("tools"), list):
        attrs["gen_ai.tool.definitions"] = orjson.dumps(params["tools"]).decode()
