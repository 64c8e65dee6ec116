"""The generic per-key fold that `StreamAccumulator` replaced (as of ff7ee3c): the reference
its faster fold is tested against (tests/client/test_reassembly_fold.py). Test code only.
"""

from __future__ import annotations

import time
from typing import Any


def _merge_logprobs(current: Any, new: Any) -> Any:
    # Chat logprobs are {"content": [...]}, completions' legacy ones are parallel lists: both
    # concatenate list values across chunks.
    if not isinstance(new, dict) or not isinstance(current, dict):
        return new if current is None else current if new is None else new
    merged = dict(current)
    for key, value in new.items():
        old = merged.get(key)
        if isinstance(old, list) and isinstance(value, list):
            merged[key] = old + value
        elif value is not None or key not in merged:
            merged[key] = value
    return merged


class _Choice:
    """One choice being reassembled from its deltas."""

    __slots__ = ("content", "extra", "index", "message_extra", "reasoning", "role", "tools")

    def __init__(self, index: Any) -> None:
        self.index = index
        self.role: Any = None
        self.content: list[str] | None = None
        self.reasoning: dict[str, list[str]] = {}  # keyed by the name the server used
        self.tools: dict[Any, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}  # choice-level fields: finish_reason, logprobs...
        self.message_extra: dict[str, Any] = {}

    def add(self, raw: dict[str, Any], chat: bool) -> bool:
        """Fold one chunk's choice in; True if it carried output (for time-to-first-token)."""
        carried = False
        extra = self.extra
        output = "delta" if chat else "text"
        for key, value in raw.items():
            if value is None:
                # Most fields are null in most chunks: a null only fills a field not seen yet.
                if key not in extra and key != output and key != "index":
                    extra[key] = None
            elif key == output:
                if chat:
                    if isinstance(value, dict):
                        carried = self._add_delta(value)
                elif isinstance(value, str):
                    if self.content is None:
                        self.content = []
                    self.content.append(value)
                    carried = bool(value)
            elif key == "logprobs":
                extra[key] = _merge_logprobs(extra.get(key), value)
            elif key == "token_ids" and isinstance(value, list):
                old = extra.get(key)
                extra[key] = old + value if isinstance(old, list) else value
            elif key != "index":
                extra[key] = value
        return carried

    def _add_delta(self, delta: dict[str, Any]) -> bool:
        carried = False
        for key, value in delta.items():
            if key == "content":
                if isinstance(value, str):
                    if self.content is None:
                        self.content = []
                    self.content.append(value)
                    carried = carried or bool(value)
            elif key in ("reasoning", "reasoning_content"):
                if isinstance(value, str):
                    self.reasoning.setdefault(key, []).append(value)
                    carried = carried or bool(value)
            elif key == "tool_calls":
                if isinstance(value, list) and value:
                    self._add_tool_calls(value)
                    carried = True
            elif key == "role":
                if value is not None:
                    self.role = value
            elif key == "refusal" and isinstance(value, str):
                self.message_extra[key] = (self.message_extra.get(key) or "") + value
                carried = carried or bool(value)
            elif value is not None or key not in self.message_extra:
                self.message_extra[key] = value
                carried = carried or (key == "audio" and value is not None)
        return carried

    def _add_tool_calls(self, entries: list[Any]) -> None:
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            slot = entry.get("index", position)
            function = entry.get("function")
            function = function if isinstance(function, dict) else {}
            call = self.tools.get(slot)
            if call is None:
                call = {
                    "id": entry.get("id"),
                    "type": entry.get("type") or "function",
                    "function": {"name": function.get("name"), "arguments": ""},
                }
                self.tools[slot] = call
            else:
                # Only the first delta of a call names it; later ones may repeat the fields.
                if call["id"] is None and entry.get("id") is not None:
                    call["id"] = entry["id"]
                if call["function"]["name"] is None and function.get("name") is not None:
                    call["function"]["name"] = function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call["function"]["arguments"] += arguments

    @property
    def finished(self) -> bool:
        return self.extra.get("finish_reason") is not None

    def build(self, chat: bool, forced_tools: bool, empty_tools: bool) -> dict[str, Any]:
        text = None if self.content is None else "".join(self.content)
        out: dict[str, Any] = {"index": self.index}
        if not chat:
            out["text"] = text if text is not None else ""
            out.update(self.extra)
            return out
        tool_calls = [self.tools[slot] for slot in sorted(self.tools, key=_sort_key)]
        message: dict[str, Any] = {
            "role": self.role or "assistant",
            # The role chunk's "" is not an answer: a parser's tool-call-only reply has null
            # content in the non-streaming body, a call forced by tool_choice has "".
            "content": text if text or not tool_calls else "" if forced_tools else None,
        }
        for key, parts in self.reasoning.items():
            message[key] = "".join(parts)
        message.update(self.message_extra)
        if tool_calls or empty_tools:
            message["tool_calls"] = tool_calls
        out["message"] = message
        out.update(self.extra)
        return out


def _sort_key(value: Any) -> tuple[int, str]:
    return (value, "") if isinstance(value, int) else (1 << 62, str(value))


class ReferenceAccumulator:
    """Folds stream chunks into the non-streaming response shape, choice by choice.

    `forced_tools`: the request forced tool calls (`tool_choice` "required" or a named tool),
    for which vLLM's non-streaming message has `content: ""` rather than null.
    """

    __slots__ = ("chat", "choices", "chunks", "forced_tools", "started", "top", "ttft_ms", "usage")

    def __init__(self, chat: bool, started: float, forced_tools: bool = False) -> None:
        self.chat = chat
        self.forced_tools = forced_tools
        self.started = started
        self.top: dict[str, Any] = {}
        self.choices: dict[Any, _Choice] = {}
        self.usage: Any = None
        self.chunks = 0
        self.ttft_ms: float | None = None

    def add(self, chunk: dict[str, Any]) -> bool:
        """Fold one chunk in; True if one of its choices finished (has a finish_reason)."""
        self.chunks += 1
        top = self.top
        choices = None
        for key, value in chunk.items():
            if key == "choices":
                choices = value
            elif key == "usage":
                if value is not None:
                    self.usage = value  # continuous stats: the last one is the running total
            elif value is not None or key not in top:
                top[key] = value
        if not isinstance(choices, list):
            return False
        carried = finished = False
        chat = self.chat
        known = self.choices
        for raw in choices:
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            choice = known.get(index)
            if choice is None:
                choice = known[index] = _Choice(index)
            if choice.add(raw, chat):
                carried = True
            if raw.get("finish_reason") is not None:
                finished = True
        if carried and self.ttft_ms is None:
            self.ttft_ms = round((time.perf_counter() - self.started) * 1000, 3)
        return finished

    def all_finished(self) -> bool:
        return bool(self.choices) and all(choice.finished for choice in self.choices.values())

    def response(self) -> dict[str, Any]:
        out = dict(self.top)
        if self.chat:
            out["object"] = "chat.completion"
        elif "object" in out:
            out["object"] = "text_completion"
        # vLLM 0.10's non-streaming messages always carry `tool_calls` ([] without calls);
        # its streams are told apart by a role chunk with `prompt_token_ids` but no
        # `prompt_text` (added later, together with omitting the empty list).
        empty_tools = self.chat and "prompt_token_ids" in out and "prompt_text" not in out
        forced = self.forced_tools
        out["choices"] = [
            self.choices[index].build(self.chat, forced, empty_tools)
            for index in sorted(self.choices, key=_sort_key)
        ]
        out["usage"] = self.usage
        return out
