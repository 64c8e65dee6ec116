"""What is captured of a call: sampling, content-free records, a redaction hook.

All three run in the client, on the record dict, before it is encoded (and before media is
moved out), and only when configured: a client without them holds no `CapturePolicy` and its
request path does not change. Order: the sampling decision (before the record is built: a
sampled-out call costs almost nothing), then `content="metadata"`, then `redact`.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from typing import Any, Literal

from ._exceptions import ConfigurationError

__all__ = ["CONTENT_MODES", "CapturePolicy", "ContentMode", "Redactor", "capture_policy"]

logger = logging.getLogger("vllm_middleware")

ContentMode = Literal["full", "metadata"]
CONTENT_MODES: tuple[str, ...] = ("full", "metadata")
#: `redact=`: gets the record dict, returns the record to store (the same dict, changed, or
#: another one) or None to store nothing.
Redactor = Callable[[dict[str, Any]], "dict[str, Any] | None"]

_SCALARS = (bool, int, float)
_RESPONSE_KEYS = ("id", "object", "created", "model", "system_fingerprint", "usage")


def _text_size(value: Any) -> int:
    """Characters of text in a content value (a string, or a list of parts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_size(part.get("text")) for part in value if isinstance(part, dict))
    return 0


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not isinstance(calls, list):
        return out
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = function.get("arguments")
            out.append(
                {
                    "name": function.get("name"),
                    "arguments_chars": len(arguments) if isinstance(arguments, str) else 0,
                }
            )
    return out


def _message(message: Any) -> dict[str, Any]:
    """A chat message without its text: role, sizes, part types, tool names."""
    if not isinstance(message, dict):
        return {"type": type(message).__name__}
    content = message.get("content")
    summary: dict[str, Any] = {"role": message.get("role"), "chars": _text_size(content)}
    if isinstance(content, list):
        summary["parts"] = [p.get("type") if isinstance(p, dict) else None for p in content]
    calls = message.get("tool_calls")
    if calls:
        summary["tool_calls"] = _tool_calls(calls)
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            summary[key] = message[key]
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str):
        summary["reasoning_chars"] = len(reasoning)
    return summary


def _prompt(prompt: Any) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"chars": len(prompt)}
    if isinstance(prompt, list):
        return {"items": len(prompt), "chars": sum(len(p) for p in prompt if isinstance(p, str))}
    return {"type": type(prompt).__name__}


def _response(response: Any) -> Any:
    if not isinstance(response, dict):
        return None if response is None else {"type": type(response).__name__}
    summary = {key: response[key] for key in _RESPONSE_KEYS if key in response}
    choices = response.get("choices")
    if isinstance(choices, list):
        out = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            item: dict[str, Any] = {
                "index": choice.get("index"),
                "finish_reason": choice.get("finish_reason"),
            }
            if "message" in choice:
                item["message"] = _message(choice.get("message"))
            if "text" in choice:
                item["chars"] = _text_size(choice.get("text"))
            out.append(item)
        summary["choices"] = out
    return summary


def _parameter(key: str, value: Any) -> Any:
    """A sampling parameter as it is when it cannot hold text; else its shape only."""
    if value is None or isinstance(value, _SCALARS):
        return value
    if key == "tools" and isinstance(value, list):
        names = []
        for tool in value:
            function = tool.get("function") if isinstance(tool, dict) else None
            names.append(function.get("name") if isinstance(function, dict) else None)
        return {"names": names}
    if key == "tool_choice":
        if isinstance(value, str):
            return value
        function = value.get("function") if isinstance(value, dict) else None
        return {"name": function.get("name") if isinstance(function, dict) else None}
    if key == "response_format" and isinstance(value, dict):
        return {"type": value.get("type")}
    if isinstance(value, str):
        return {"chars": len(value)}
    if isinstance(value, (list, dict)):
        return {"items": len(value)}
    return {"type": type(value).__name__}


def metadata_only(record: dict[str, Any]) -> dict[str, Any]:
    """`record` without any message, prompt or response text (sizes and names instead)."""
    messages = record.get("messages")
    if messages is not None:
        record["messages"] = (
            [_message(m) for m in messages] if isinstance(messages, list) else _prompt(messages)
        )
    if record.get("prompt") is not None:
        record["prompt"] = _prompt(record["prompt"])
    record["response"] = _response(record.get("response"))
    parameters = record.get("parameters")
    if isinstance(parameters, dict):
        record["parameters"] = {k: _parameter(k, v) for k, v in parameters.items()}
    detail = record.get("error_detail")
    if isinstance(detail, dict) and "message" in detail:
        # The server's message can quote the input; `error` keeps the one-line summary.
        record["error_detail"] = {k: v for k, v in detail.items() if k != "message"}
    record["content"] = "metadata"
    return record


class CapturePolicy:
    """The capture options of one client, and what they did (for `get_statistics`)."""

    __slots__ = ("metadata", "rate", "redact", "redact_errors", "redacted_out", "sampled_out")

    def __init__(self, redact: Redactor | None, content: ContentMode, sample_rate: float) -> None:
        self.redact = redact
        self.metadata = content == "metadata"
        self.rate = sample_rate
        self.sampled_out = 0  # calls not recorded by sampling (errors are always recorded)
        self.redacted_out = 0  # records the redact hook dropped (returned None)
        self.redact_errors = 0  # records dropped because the hook raised or returned a non-dict

    def sampled(self, request_id: str, client_request_id: Any) -> bool:
        """Whether a successful call is recorded: the same id always gives the same answer.

        The caller's own id (`X-Request-Id`), when there is one, so that the services of one
        request keep or drop it together; else the middleware's request id.
        """
        key = client_request_id if isinstance(client_request_id, str) else request_id
        if zlib.crc32(key.encode("utf-8", "surrogatepass")) < self.rate * 4294967296.0:
            return True
        self.sampled_out += 1
        return False

    def apply(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The record to store, or None (counted) when the hook drops it or fails.

        A hook that fails drops the record rather than store what it was meant to clean.
        """
        if self.metadata:
            record = metadata_only(record)
        redact = self.redact
        if redact is None:
            return record
        try:
            result = redact(record)
        except Exception:
            self.redact_errors += 1
            count = self.redact_errors
            if count == 1 or count % 1000 == 0:
                logger.exception(
                    "redact hook failed: record dropped (%d so far)", self.redact_errors
                )
            return None
        if result is None:
            self.redacted_out += 1
            return None
        if not isinstance(result, dict):
            self.redact_errors += 1
            if self.redact_errors == 1 or self.redact_errors % 1000 == 0:
                logger.error(
                    "redact hook returned %s, not a dict or None: record dropped",
                    type(result).__name__,
                )
            return None
        return result

    def statistics(self) -> dict[str, Any]:
        return {
            "sampled_out": self.sampled_out,
            "redacted_out": self.redacted_out,
            "redact_errors": self.redact_errors,
        }


def capture_policy(
    redact: Redactor | None, content: str, sample_rate: float
) -> CapturePolicy | None:
    """The policy for a client's options; None when all are defaults (nothing to do)."""
    if content not in CONTENT_MODES:
        raise ConfigurationError(f"content must be 'full' or 'metadata', not {content!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise ConfigurationError(f"sample_rate must be a number in [0, 1], not {sample_rate!r}")
    if not (math.isfinite(sample_rate) and 0.0 <= sample_rate <= 1.0):
        raise ConfigurationError(f"sample_rate must be in [0, 1], not {sample_rate!r}")
    if redact is not None and not callable(redact):
        raise ConfigurationError(f"redact must be a callable or None, not {redact!r}")
    if redact is None and content == "full" and sample_rate == 1.0:
        return None
    return CapturePolicy(redact, "metadata" if content == "metadata" else "full", sample_rate)
