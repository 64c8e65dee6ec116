"""What the fake vLLM "model" answers, and how it counts tokens.

Everything here is a pure function of the request, so tests can compute the exact output the
server will produce (see :func:`fake_reply` and :func:`fake_tool_arguments`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Chunker = Callable[[str], list[str]]
"""Splits a text (reply, reasoning or tool-argument JSON) into the deltas a stream sends."""

REASONING_TEXT = "Let me think about this request."
"""The reasoning the fake emits (before the answer) when the server has ``reasoning=True``."""

_TEXT_PARTS = ("text", "input_text", "output_text")
_WORD = re.compile(r"\S+")
_WORD_WITH_LEADING_SPACE = re.compile(r"\s*\S+")
_WEATHER = re.compile(r"\bweather\b", re.IGNORECASE)
_STATUS = re.compile(r"\[\[status:(\d{3})\]\]")
_SLOW = re.compile(r"\[\[slow:(\d+(?:\.\d*)?)\]\]")


def count_tokens(text: str) -> int:
    """The fake's tokenizer: one token per whitespace-separated word."""
    return len(_WORD.findall(text))


def truncate_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """Cut ``text`` after ``max_tokens`` words; return the kept prefix and whether it was cut."""
    if max_tokens <= 0:
        return "", count_tokens(text) > 0
    for position, match in enumerate(_WORD.finditer(text)):
        if position == max_tokens - 1:
            end = match.end()
            if count_tokens(text[end:]) == 0:
                return text, False
            return text[:end], True
    return text, False


def default_chunker(text: str) -> list[str]:
    """Split into words, each carrying the whitespace before it (like BPE tokens do)."""
    pieces = _WORD_WITH_LEADING_SPACE.findall(text)
    consumed = sum(len(piece) for piece in pieces)
    if consumed < len(text):
        # Trailing whitespace has no word after it; glue it to the last piece so nothing is lost.
        if pieces:
            pieces[-1] += text[consumed:]
        else:
            pieces = [text]
    return pieces


def reply_prefix(index: int) -> str:
    """Choice 0 starts with ``"Echo: "``; choice i>0 with ``"Echo#i: "`` (same token count)."""
    return "Echo: " if index == 0 else f"Echo#{index}: "


@dataclass(frozen=True)
class FakeReply:
    """What one choice of the fake contains (for text answers, not tool calls)."""

    content: str
    reasoning: str | None
    finish_reason: str
    completion_tokens: int


def fake_reply(
    text: str, *, index: int = 0, max_tokens: int | None = None, reasoning: bool = False
) -> FakeReply:
    """The answer to ``text`` (last user message text, or a completions prompt).

    The reasoning (when enabled) comes first and consumes the ``max_tokens`` budget before the
    content does, as it would with a real reasoning model.
    """
    full = reply_prefix(index) + text
    budget = max_tokens
    reasoning_out: str | None = None
    cut = False
    if reasoning:
        if budget is None:
            reasoning_out = REASONING_TEXT
        else:
            reasoning_out, cut = truncate_tokens(REASONING_TEXT, budget)
            budget -= count_tokens(reasoning_out)
        reasoning_out = reasoning_out or None
    if cut:
        content = ""
    elif budget is None:
        content = full
    else:
        content, cut = truncate_tokens(full, budget)
    tokens = count_tokens(reasoning_out or "") + count_tokens(content)
    return FakeReply(content, reasoning_out, "length" if cut else "stop", tokens)


def _schema_type(schema: Mapping[str, Any]) -> Any:
    declared = schema.get("type")
    if isinstance(declared, list):
        non_null = [item for item in declared if item != "null"]
        return non_null[0] if non_null else None
    return declared


def fake_tool_arguments(tool: Mapping[str, Any], text: str) -> str:
    """The ``arguments`` string the fake produces for ``tool`` given the last user text.

    Each declared property gets a value by JSON-schema type; strings get the last word of the
    text (so "Weather in Zürich?" gives ``{"city": "Zürich"}``), enums their first member.
    """
    function = tool.get("function")
    parameters = function.get("parameters") if isinstance(function, Mapping) else None
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    words = re.findall(r"\w+", text)
    last_word = words[-1] if words else ""
    defaults: dict[str, Any] = {
        "string": last_word,
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "object": {},
    }
    arguments: dict[str, Any] = {}
    if isinstance(properties, Mapping):
        for name, schema in properties.items():
            if not isinstance(schema, Mapping):
                arguments[str(name)] = None
                continue
            enum = schema.get("enum")
            if isinstance(enum, list) and enum:
                arguments[str(name)] = enum[0]
            else:
                arguments[str(name)] = defaults.get(_schema_type(schema))
    return json.dumps(arguments, ensure_ascii=False)


def tool_name(tool: Mapping[str, Any]) -> str:
    function = tool.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) else ""


def mentions_weather(text: str) -> bool:
    return _WEATHER.search(text) is not None


def content_text(content: Any) -> str:
    """Text of a message ``content``: the string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS:
                value = part.get("text")
                if isinstance(value, str):
                    texts.append(value)
        return " ".join(texts)
    return ""


@dataclass(frozen=True)
class Triggers:
    """Fault-injection words found in the last user text / prompt."""

    status: int | None = None
    midstream_error: bool = False
    drop: bool = False
    hang: bool = False
    slow: float = 0.0


def parse_triggers(text: str) -> Triggers:
    status = _STATUS.search(text)
    slow = _SLOW.search(text)
    return Triggers(
        status=int(status.group(1)) if status else None,
        midstream_error="[[midstream_error]]" in text,
        drop="[[drop]]" in text,
        hang="[[hang]]" in text,
        slow=float(slow.group(1)) if slow else 0.0,
    )


def split_text(chunker: Chunker | None, text: str) -> list[str]:
    """Apply the configured chunker, dropping empty pieces (vLLM never sends empty deltas)."""
    pieces = (chunker or default_chunker)(text)
    if "".join(pieces) != text:
        raise ValueError("chunker must return pieces that concatenate to the input text")
    return [piece for piece in pieces if piece]
