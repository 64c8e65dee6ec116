"""Reading a vLLM stream: SSE framing, and folding chunks back into one response.

Both are pure and synchronous, so they are cheap to test and keep no reference to the network.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["SSEDecoder", "StreamAccumulator"]

_CARRIED = 1  # `_Choice.add`: the chunk carried output
_FINISHED = 2  # ... and a finish_reason


class SSEDecoder:
    """Server-sent events from the raw body: bytes in, the `data` payload (bytes) of each event out.

    Comments (`: keep-alive`) and `event:`/`id:`/`retry:` fields are skipped; several `data:`
    lines in one event are joined with newlines, as the SSE specification says.

    Working on bytes spares the text decoding and line splitting layers of `aiter_lines`, and
    orjson parses the payload bytes directly. Lines end at CRLF, LF or CR, as the SSE
    specification says (`str.splitlines` would also split a JSON string at U+2028 or U+0085).
    """

    __slots__ = ("_data", "_tail")

    def __init__(self) -> None:
        self._data: list[bytes] = []
        self._tail = b""  # the start of a line whose end has not arrived

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events that `chunk` completes (usually one, often none)."""
        if self._tail:
            chunk = self._tail + chunk
        elif (
            # The usual body chunk from vLLM: exactly one event of one data line.
            chunk[:6] == b"data: "
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-1:] == b"\n"
            and not self._data
            and b"\r" not in chunk
        ):
            return [chunk[6:-2]]
        if b"\r" in chunk:
            # A CR at the end may be half of a CRLF: keep it until the next chunk says.
            held = chunk[-1:] == b"\r"
            if held:
                chunk = chunk[:-1]
            lines = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            self._tail = lines.pop() + b"\r" if held else lines.pop()
        else:
            lines = chunk.split(b"\n")
            self._tail = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line:
                if line == b"data":  # a field with no colon has an empty value
                    data.append(b"")
            elif data:
                events.append(data[0] if len(data) == 1 else b"\n".join(data))
                data.clear()
        return events

    def close(self) -> list[bytes]:
        """At the end of the body: an unterminated last line, then any undispatched event."""
        tail, self._tail = self._tail, b""
        events = self.feed(tail.removesuffix(b"\r") + b"\n\n") if tail else []
        if self._data:
            events += self.feed(b"\n")
        return events


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

    def add(self, raw: dict[str, Any], chat: bool) -> int:
        """Fold one chunk's choice in: `_CARRIED` if it carried output (for time-to-first-token),
        plus `_FINISHED` if it has a finish_reason.

        One pass over the fields, the usual chunk's steps first: a null for a field seen before,
        and a delta of content alone (inlined).
        """
        flags = 0
        extra = self.extra
        for key, value in raw.items():
            if value is None:
                # Most fields are null in most chunks: a null only fills a field not seen yet.
                if key not in extra and key != "index" and key != ("delta" if chat else "text"):
                    extra[key] = None
            elif key == "delta" and chat:
                if (
                    type(value) is dict
                    and len(value) == 1
                    and type(text := value.get("content")) is str
                ):
                    if self.content is None:
                        self.content = [text]
                    else:
                        self.content.append(text)
                    if text:
                        flags |= _CARRIED
                elif isinstance(value, dict) and self._add_delta(value):
                    flags |= _CARRIED
            elif key == "index":
                continue
            elif key == "text" and not chat:
                if isinstance(value, str):
                    if self.content is None:
                        self.content = []
                    self.content.append(value)
                    if value:
                        flags |= _CARRIED
            elif key == "logprobs":
                extra[key] = _merge_logprobs(extra.get(key), value)
            elif key == "token_ids" and isinstance(value, list):
                old = extra.get(key)
                extra[key] = old + value if isinstance(old, list) else value
            else:
                extra[key] = value
                if key == "finish_reason":
                    flags |= _FINISHED
        return flags

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
        tools = self.tools
        # (no comprehension for the usual reply without calls: it is a frame of its own)
        tool_calls = [tools[slot] for slot in sorted(tools, key=_sort_key)] if tools else []
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


class StreamAccumulator:
    """Folds stream chunks into the non-streaming response shape, choice by choice.

    `forced_tools`: the request forced tool calls (`tool_choice` "required" or a named tool),
    for which vLLM's non-streaming message has `content: ""` rather than null.
    """

    __slots__ = (
        "chat",
        "choices",
        "chunks",
        "forced_tools",
        "may_hold_media",
        "started",
        "top",
        "ttft_ms",
    )

    def __init__(self, chat: bool, started: float, forced_tools: bool = False) -> None:
        self.chat = chat
        self.forced_tools = forced_tools
        self.started = started
        self.top: dict[str, Any] = {}
        self.choices: dict[Any, _Choice] = {}
        self.chunks = 0
        self.ttft_ms: float | None = None
        #: set by `response()`: whether the reply has audio, the one place a reply's media
        #: blob can be (False spares the record's media walk)
        self.may_hold_media = True

    def add(self, chunk: dict[str, Any]) -> bool:
        """Fold one chunk in; True if one of its choices finished (has a finish_reason)."""
        self.chunks += 1
        top = self.top
        # "choices" and "usage" are kept too, as the others, and taken out by `response`:
        # one test per field, not three.
        for key, value in chunk.items():
            if value is not None or key not in top:
                top[key] = value
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        flags = 0
        known = self.choices
        for raw in choices:
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            choice = known.get(index)
            if choice is None:
                choice = known[index] = _Choice(index)
            flags |= choice.add(raw, self.chat)
        if flags & _CARRIED and self.ttft_ms is None:
            self.ttft_ms = round((time.perf_counter() - self.started) * 1000, 3)
        return flags >= _FINISHED

    @property
    def usage(self) -> Any:
        """The last non-null usage (with continuous stats, the running total)."""
        return self.top.get("usage")

    def all_finished(self) -> bool:
        return bool(self.choices) and all(choice.finished for choice in self.choices.values())

    def response(self) -> dict[str, Any]:
        """The non-streaming response the folded chunks stand for (the fold is unchanged)."""
        top = self.top
        choices = self.choices
        if self.chat and len(choices) == 1:
            (choice,) = choices.values()
            if not (choice.tools or choice.reasoning or choice.message_extra):
                return self._plain_chat(top, choice)
        return self._response()

    def _plain_chat(self, top: dict[str, Any], choice: _Choice) -> dict[str, Any]:
        """`_response()` for the usual reply: one chat choice of text alone (no tool calls,
        reasoning, audio or other message fields), built in its final shape at once."""
        content = choice.content
        message = {
            "role": choice.role or "assistant",
            "content": None if content is None else "".join(content),
        }
        if "prompt_token_ids" in top and "prompt_text" not in top:  # see `_response`
            message["tool_calls"] = []
        built = {"index": choice.index, "message": message, **choice.extra}
        # The folded fields keep "choices" and "usage" where they first came: when they are
        # the last two (the usual stream), a copy has the response's key order already.
        out = top.copy()
        last = reversed(top)
        if next(last, None) != "usage" or next(last, None) != "choices" or "object" not in top:
            del out["choices"]
            usage = out.pop("usage", None)
            out["object"] = "chat.completion"
            out["choices"] = [built]
            out["usage"] = usage
        else:
            out["object"] = "chat.completion"
            out["choices"] = [built]
        self.may_hold_media = False
        return out

    def _response(self) -> dict[str, Any]:
        out = dict(self.top)
        out.pop("choices", None)
        usage = out.pop("usage", None)
        if self.chat:
            out["object"] = "chat.completion"
        elif "object" in out:
            out["object"] = "text_completion"
        # vLLM 0.10's non-streaming messages always carry `tool_calls` ([] without calls);
        # its streams are told apart by a role chunk with `prompt_token_ids` but no
        # `prompt_text` (added later, together with omitting the empty list).
        empty_tools = self.chat and "prompt_token_ids" in out and "prompt_text" not in out
        forced = self.forced_tools
        choices = self.choices
        # One choice (the usual reply): no sort, whose key is a Python call.
        order = sorted(choices, key=_sort_key) if len(choices) > 1 else choices
        built = []
        media = False
        for index in order:
            choice = choices[index]
            built.append(choice.build(self.chat, forced, empty_tools))
            if choice.message_extra.get("audio") is not None:
                media = True
        out["choices"] = built
        out["usage"] = usage
        self.may_hold_media = media
        return out
