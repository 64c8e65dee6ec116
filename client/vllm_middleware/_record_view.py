"""Read-side views of one record shared by `tail`, `export` and the other log tools.

Pure functions over the parsed record (a mapping): they never assume a field is present, so
old schema versions, failed calls, redacted and metadata-only records (no message text) all
read as "nothing there" instead of raising.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import ConfigurationError
from ._reader import DateLike, ReadStats, iter_logs
from ._record import LogRecord

__all__ = [
    "RecordFilter",
    "answer_text",
    "content_text",
    "finish_reasons",
    "first_choice",
    "iter_filtered",
    "parse_meta",
    "prompt_text",
    "token_counts",
]


def content_text(content: Any) -> str:
    """The text of a message's `content`: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
                elif part.get("type") in ("image_url", "input_audio", "audio_url", "video_url"):
                    texts.append(f"[{part.get('type')}]")
        return " ".join(texts)
    return ""


def prompt_text(record: Mapping[str, Any]) -> str:
    """What was asked: the last user turn of a chat, or the completion prompt ('' if none)."""
    messages = record.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return content_text(message.get("content"))
        for message in reversed(messages):
            if isinstance(message, dict):
                return content_text(message.get("content"))
        return ""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])
    return ""


def first_choice(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    response = record.get("response")
    if not isinstance(response, dict):
        return None
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def answer_text(record: Mapping[str, Any]) -> str:
    """The first choice's answer text, or its tool calls' names ('' when there is none)."""
    choice = first_choice(record)
    if choice is None:
        return ""
    message = choice.get("message")
    if isinstance(message, dict):
        text = content_text(message.get("content"))
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            names = [
                str(call.get("function", {}).get("name", "?"))
                for call in calls
                if isinstance(call, dict) and isinstance(call.get("function"), dict)
            ]
            text = (text + " " if text else "") + f"[tool_calls: {', '.join(names)}]"
        return text
    completion = choice.get("text")
    return completion if isinstance(completion, str) else ""


def finish_reasons(record: Mapping[str, Any]) -> list[str]:
    response = record.get("response")
    if not isinstance(response, dict):
        return []
    choices = response.get("choices")
    if not isinstance(choices, list):
        return []
    return [
        str(choice["finish_reason"])
        for choice in choices
        if isinstance(choice, dict) and choice.get("finish_reason") is not None
    ]


def token_counts(record: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(input tokens, output tokens) from the record's usage, None where not reported."""
    usage = record.get("usage")
    if not isinstance(usage, dict):
        response = record.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def parse_meta(pairs: list[str] | None) -> dict[str, str]:
    """`key=value` command-line pairs as a dict (values compared as text)."""
    meta: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--meta takes key=value, not {pair!r}")
        meta[key] = value
    return meta


@dataclass
class RecordFilter:
    """Which records a tool reads: partitions pruned by date and host, records by the rest."""

    since: DateLike | None = None
    until: DateLike | None = None
    host: str | None = None
    model: str | None = None
    errors_only: bool = False
    exclude_errors: bool = False
    meta: dict[str, str] = field(default_factory=dict)
    finish_reason: str | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        """The per-record tests `iter_logs` does not do itself."""
        if self.exclude_errors and record.get("error") is not None:
            return False
        if self.meta:
            metadata = record.get("metadata")
            if not isinstance(metadata, dict):
                return False
            for key, value in self.meta.items():
                if key not in metadata or _as_text(metadata[key]) != value:
                    return False
        return self.finish_reason is None or self.finish_reason in finish_reasons(record)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def iter_filtered(
    log_dir: str | os.PathLike[str],
    flt: RecordFilter,
    *,
    stats: ReadStats | None = None,
    restore_media: bool = False,
) -> Iterator[LogRecord]:
    """Records of the tree that pass `flt`, in the reader's order, in constant memory."""
    for record in iter_logs(
        log_dir,
        flt.since,
        flt.until,
        host=flt.host,
        model=flt.model,
        errors_only=flt.errors_only,
        stats=stats,
        restore_media=restore_media,
    ):
        if flt.matches(record):
            yield record
