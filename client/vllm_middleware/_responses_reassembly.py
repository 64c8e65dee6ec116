"""Folding a streamed Responses API call (`POST /v1/responses`, typed events) into the final
response object, as `_reassembly` does for chat and completions chunks.

The terminal event (`response.completed`, `response.incomplete`, `response.failed`) carries the
whole response: when it arrives it is the record. A stream cut before it is rebuilt from the
events seen so far: the last response snapshot, each output item as added or done, and the
text and argument deltas of the items not done yet. Pure and synchronous.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["TERMINAL_EVENTS", "ResponsesAccumulator"]

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_SNAPSHOTS = frozenset({"response.created", "response.in_progress", "response.queued"})
_TEXT_DELTAS = {
    "response.output_text.delta": "output_text",
    "response.reasoning_text.delta": "reasoning_text",
    "response.refusal.delta": "refusal",
}


class ResponsesAccumulator:
    """Keeps what a Responses stream said; `response()` is the object the stream describes."""

    __slots__ = ("chunks", "final", "items", "parts", "snapshot", "started", "ttft_ms")

    def __init__(self, started: float) -> None:
        self.started = started
        self.chunks = 0
        self.ttft_ms: float | None = None
        self.snapshot: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.items: dict[int, dict[str, Any]] = {}  # output_index -> item
        # (output_index, content_index) -> [part kind, text pieces]; arguments use index -1.
        self.parts: dict[tuple[int, int], tuple[str, list[str]]] = {}

    def add(self, event: dict[str, Any]) -> bool:
        """Fold one event in; True when it ended the response."""
        self.chunks += 1
        kind = event.get("type")
        if kind in TERMINAL_EVENTS or kind in _SNAPSHOTS:
            response = event.get("response")
            if isinstance(response, dict):
                if kind in TERMINAL_EVENTS:
                    self.final = response
                    return True
                self.snapshot = response
            return False
        index = event.get("output_index")
        if not isinstance(index, int):
            return False
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict):
                self.items[index] = item
                if kind == "response.output_item.done":
                    # The item is whole: its deltas are no longer needed.
                    for key in [key for key in self.parts if key[0] == index]:
                        del self.parts[key]
            return False
        if kind in ("response.content_part.added", "response.content_part.done"):
            self._part(index, event, done=kind.endswith(".done"))
            return False
        delta = event.get("delta")
        if not isinstance(delta, str):
            return False
        if kind in _TEXT_DELTAS:
            content = event.get("content_index", 0)
            key = (index, content if isinstance(content, int) else 0)
            self.parts.setdefault(key, (_TEXT_DELTAS[kind], []))[1].append(delta)
        elif kind == "response.function_call_arguments.delta":
            self.parts.setdefault((index, -1), ("arguments", []))[1].append(delta)
        else:
            return False
        if delta and self.ttft_ms is None:
            self.ttft_ms = round((time.perf_counter() - self.started) * 1000, 3)
        return False

    def _part(self, index: int, event: dict[str, Any], done: bool) -> None:
        part, position = event.get("part"), event.get("content_index")
        item = self.items.get(index)
        if item is None or not isinstance(part, dict) or not isinstance(position, int):
            return
        content = list(item.get("content") or [])
        while len(content) <= position:
            content.append({})
        content[position] = part
        self.items[index] = {**item, "content": content}
        if done:
            self.parts.pop((index, position), None)

    def all_finished(self) -> bool:
        return self.final is not None

    def response(self) -> dict[str, Any] | None:
        if self.final is not None:
            return self.final
        if self.snapshot is None and not self.items:
            return None
        out = dict(self.snapshot or {"object": "response"})
        out["status"] = "incomplete"
        out["output"] = [self._item(index) for index in sorted(self.items)]
        return out

    def _item(self, index: int) -> dict[str, Any]:
        item = dict(self.items[index])
        pending = {key: value for key, value in self.parts.items() if key[0] == index}
        if not pending:
            return item
        arguments = pending.pop((index, -1), None)
        if arguments is not None:
            item["arguments"] = str(item.get("arguments") or "") + "".join(arguments[1])
        if pending:
            content = [dict(part) for part in item.get("content") or []]
            for (_, position), (kind, pieces) in sorted(pending.items()):
                while len(content) <= position:
                    content.append({})
                part = content[position]
                part.setdefault("type", kind)
                part["text"] = str(part.get("text") or "") + "".join(pieces)
            item["content"] = content
        return item
