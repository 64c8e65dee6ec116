"""`vllm-mw export`: fine-tuning sets and OTLP spans from the log tree, in constant memory.

Each format is a pure function from one record to zero or more output objects (`None` when the
record cannot make one, with the reason counted); `export` streams the reader's records through
it into a file written beside its target and renamed into place when complete, so a failed or
interrupted export never leaves a half-written set under the final name.

Fine-tuning formats (one training example per successful record):
- `openai-chat`: `{"messages": [...], "tools": [...]}` as OpenAI's chat fine-tuning accepts it:
  the request's turns, then the answer as an assistant turn with its tool calls.
- `openai-completions`: `{"prompt": ..., "completion": ...}` for `/completions` records.
- `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"function_call"|"observation", ...}],
  "system": ..., "tools": "<JSON>"}`, the layout LLaMA-Factory and similar trainers read
  (text only: media parts are dropped).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from ._exceptions import ConfigurationError
from ._reader import ReadStats, iter_dicts
from ._record_view import RecordFilter, first_choice

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "export", "to_chat", "to_completion"]

MediaChoice = Literal["keep", "drop"]
FORMATS = ("openai-chat", "openai-completions", "sharegpt", "otlp-json")

_MEDIA_PARTS = frozenset(("image_url", "input_audio", "audio_url", "video_url", "file"))
# The output file's buffer: lines are copied into it by `writelines` (a loop in C) and written
# in pieces of this size. Small on purpose: with 1 MiB of lines held at once, the allocator
# handed memory back to the kernel and faulted it in again on every flush.
_WRITE_BYTES = 1 << 16
_CHAT_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
_CHAT_KEY_SET = frozenset(_CHAT_KEYS)


@dataclass
class ExportOptions:
    """How records become output lines (besides which records: see `RecordFilter`)."""

    media: MediaChoice = "keep"  # keep: restored from the media store; drop: text only
    dedupe: bool = False  # one example per distinct conversation (the first seen)
    otlp_content: bool = False  # otlp-json: message contents as span attributes (opt-in)
    service_name: str = "vllm-middleware"
    server_address: str | None = None  # otlp-json: where the model server was


@dataclass
class ExportResult:
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    read: ReadStats = field(default_factory=ReadStats)


class _Skip(Exception):
    """This record makes no example; the message is the reason counted."""


def _media_part(part: Mapping[str, Any]) -> bool:
    return part.get("type") in _MEDIA_PARTS or any(k in part for k in _MEDIA_PARTS)


def _has_ref(value: Any) -> bool:
    # A media reference left in place: the file was not stored or is missing.
    return b'"media_ref"' in orjson.dumps(value)


def _clean_content(content: Any, media: MediaChoice) -> Any:
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if _media_part(part) and (media == "drop" or _has_ref(part)):
            continue
        parts.append(part)
    if not parts:
        return ""
    return parts


def _clean_message(message: Any, media: MediaChoice) -> dict[str, Any]:
    if (
        type(message) is dict
        and type(message.get("content")) is str
        and type(message.get("role")) is str
        and message.keys() <= _CHAT_KEY_SET
        and None not in message.values()
    ):
        return message  # a plain text turn with known keys only, as it is (most turns)
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _Skip("malformed message")
    out = {key: message[key] for key in _CHAT_KEYS if message.get(key) is not None}
    if "content" in out:
        out["content"] = _clean_content(out["content"], media)
    elif message["role"] != "assistant":
        out["content"] = ""
    return out


def _answer(record: Mapping[str, Any]) -> dict[str, Any]:
    response = record.get("response")
    choices = response.get("choices") if type(response) is dict else None
    choice = choices[0] if type(choices) is list and choices else None
    message = choice.get("message") if type(choice) is dict else None
    if type(message) is not dict:
        raise _Skip("no answer")
    answer: dict[str, Any] = {"role": "assistant"}
    content = message.get("content")
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        answer["tool_calls"] = [
            {
                "id": call.get("id") or f"call_{i}",
                "type": "function",
                "function": {
                    "name": call["function"].get("name"),
                    "arguments": call["function"].get("arguments") or "{}",
                },
            }
            for i, call in enumerate(calls)
            if isinstance(call, dict) and isinstance(call.get("function"), dict)
        ]
        if content:
            answer["content"] = content
    elif isinstance(content, str) and content:
        answer["content"] = content
    else:
        raise _Skip("no answer")
    return answer


def to_chat(record: Mapping[str, Any], options: ExportOptions) -> dict[str, Any]:
    """One `openai-chat` example (raises `_Skip` with the reason when there is none)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Skip("no messages (a completions or metadata-only record)")
    media = options.media
    # A plain text turn with known keys only is kept as it is (most turns), tested inline:
    # a call per turn cost more than the test.
    turns = [
        m
        if type(m) is dict
        and type(m.get("content")) is str
        and type(m.get("role")) is str
        and m.keys() <= _CHAT_KEY_SET
        and None not in m.values()
        else _clean_message(m, media)
        for m in messages
    ]
    turns.append(_answer(record))
    example: dict[str, Any] = {"messages": turns}
    params = record.get("parameters")
    if isinstance(params, dict):
        tools = params.get("tools")
        if isinstance(tools, list) and tools:
            example["tools"] = tools
            if isinstance(params.get("parallel_tool_calls"), bool):
                example["parallel_tool_calls"] = params["parallel_tool_calls"]
    return example


def to_completion(record: Mapping[str, Any], options: ExportOptions) -> dict[str, Any]:
    """One `openai-completions` example: the prompt text and the first choice's text."""
    del options
    prompt = record.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _Skip("no text prompt (a chat, token-id or metadata-only record)")
    choice = first_choice(record)
    text = choice.get("text") if choice is not None else None
    if not isinstance(text, str) or not text:
        raise _Skip("no answer")
    return {"prompt": prompt, "completion": text}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _request_text(content: Any) -> str:
    """A request turn's text as `openai-chat` with media dropped would leave it."""
    if type(content) is str:
        return content
    if type(content) is list:
        return "".join(
            p["text"]
            for p in content
            if type(p) is dict and type(p.get("text")) is str and not _media_part(p)
        )
    return ""


def _has_text_left(content: Any) -> bool:
    # Whether an assistant turn keeps any content once media parts are dropped.
    if type(content) is list:
        return any(type(p) is dict and not _media_part(p) for p in content)
    return bool(content)


def _function_call(function: Mapping[str, Any]) -> dict[str, str]:
    value = {"name": function["name"], "arguments": _arguments(function["arguments"])}
    return {"from": "function_call", "value": orjson.dumps(value).decode()}


def to_sharegpt(record: Mapping[str, Any], options: ExportOptions) -> dict[str, Any]:
    """One `sharegpt` example from the same turns as `openai-chat` (text only).

    Read from the record directly rather than through `to_chat`: the same turns and the same
    skips, without building the chat example first."""
    del options
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Skip("no messages (a completions or metadata-only record)")
    system: list[str] = []
    turns: list[dict[str, str]] = []
    add = turns.append
    for message in messages:
        role = message.get("role") if type(message) is dict else None
        if type(role) is not str:
            raise _Skip("malformed message")
        if role == "user":
            add({"from": "human", "value": _request_text(message.get("content"))})
        elif role == "assistant":
            calls = message.get("tool_calls")
            if calls:
                if type(calls) is not list:
                    raise _Skip("malformed message")
                for call in calls:
                    function = call.get("function") if type(call) is dict else None
                    if type(function) is not dict or not function.keys() >= _CALL_KEYS:
                        raise _Skip("malformed message")
                    add(_function_call(function))
            content = message.get("content")
            if _has_text_left(content):
                add({"from": "gpt", "value": _request_text(content)})
        elif role == "tool":
            add({"from": "observation", "value": _request_text(message.get("content"))})
        elif role == "system" or role == "developer":
            system.append(_request_text(message.get("content")))
    answer = _answer(record)
    for call in answer.get("tool_calls", ()):
        add(_function_call(call["function"]))
    if answer.get("content"):
        add({"from": "gpt", "value": _text(answer["content"])})
    example: dict[str, Any] = {"conversations": turns}
    if system:
        example["system"] = "\n".join(system)
    params = record.get("parameters")
    if type(params) is dict:
        tools = params.get("tools")
        if type(tools) is list and tools:
            example["tools"] = orjson.dumps(tools).decode()
    return example


_CALL_KEYS = frozenset(("name", "arguments"))


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    return arguments


def _conversation_key(example: Mapping[str, Any]) -> bytes:
    # The exchange minus its answer: a retried or repeated conversation collapses into the
    # first answer seen. Eight bytes per distinct conversation are kept in memory.
    body = dict(example)
    for key in ("messages", "conversations"):
        if isinstance(body.get(key), list):
            body[key] = body[key][:-1]
    body.pop("completion", None)
    return hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()


_Converter = Callable[[Mapping[str, Any], ExportOptions], dict[str, Any]]
_CONVERTERS: dict[str, _Converter] = {
    "openai-chat": to_chat,
    "openai-completions": to_completion,
    "sharegpt": to_sharegpt,
}


def examples(
    records: Iterable[Mapping[str, Any]], fmt: str, options: ExportOptions, result: ExportResult
) -> Iterator[dict[str, Any]]:
    """The fine-tuning examples of `records` in format `fmt`, skipped ones counted by reason."""
    convert = _CONVERTERS[fmt]
    seen: set[bytes] | None = set() if options.dedupe else None
    skipped = result.skipped
    for record in records:
        try:
            example = convert(record, options)
        except _Skip as skip:
            skipped[str(skip)] += 1
            continue
        if seen is not None:
            key = _conversation_key(example)
            if key in seen:
                skipped["duplicate conversation"] += 1
                continue
            seen.add(key)
        yield example


def _example_lines(
    records: Iterable[Mapping[str, Any]],
    fmt: str,
    options: ExportOptions,
    result: ExportResult,
    *,
    skip_errors: bool = False,
) -> Iterator[bytes]:
    """`examples` encoded, one line each, counted in `result.written`: the same loop in one
    frame, since a generator layer per record costs about as much as converting a short
    record."""
    written = 0
    try:
        if options.dedupe:
            for example in examples(records, fmt, options, result):
                written += 1
                yield _dumps(example, option=_NEWLINE)
            return
        convert = _CONVERTERS[fmt]
        skipped = result.skipped
        for record in records:
            if skip_errors and record.get("error") is not None:
                continue
            try:
                line = _dumps(convert(record, options), option=_NEWLINE)
            except _Skip as skip:
                skipped[str(skip)] += 1
                continue
            written += 1
            yield line
    finally:
        result.written += written


_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def _progress(
    enabled: bool,
) -> tuple[AbstractContextManager[Any] | None, Callable[[int], None]]:
    """A live record counter on stderr for long exports: only on a terminal, only with rich
    (None: no counter)."""
    if not (enabled and sys.stderr.isatty()):
        return None, lambda n: None
    try:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        return None, lambda n: None
    progress = Progress(
        SpinnerColumn(),
        TextColumn("exported {task.completed:,} records"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task("export", total=None)
    return progress, lambda n: progress.update(task, completed=n)


def export(
    log_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    fmt: str,
    flt: RecordFilter,
    options: ExportOptions | None = None,
    *,
    progress: bool = False,
    otlp_endpoint: str | None = None,
) -> ExportResult:
    """Write the records of `log_dir` that pass `flt` to `out` ("-": stdout) in format `fmt`;
    with `otlp_endpoint` (format otlp-json, `out` None) post the spans there instead."""
    if fmt not in FORMATS:
        raise ConfigurationError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    opts = options or ExportOptions()
    result = ExportResult()
    # Fine-tuning sets leave errors out: tested in the converting loop when that is the only
    # per-record test, since a filter call per record costs more than the test itself.
    skip_errors = (
        fmt in _CONVERTERS
        and not opts.dedupe
        and flt.exclude_errors
        and not flt.meta
        and flt.finish_reason is None
    )
    if skip_errors:
        flt = replace(flt, exclude_errors=False)
    records = _dicts(log_dir, flt, result.read, restore_media=opts.media == "keep")
    if otlp_endpoint is not None:
        if fmt != "otlp-json" or out is not None:
            raise ConfigurationError("--otlp-endpoint goes with --format otlp-json, without --out")
        from ._otlp_send import send_otlp

        send_otlp(records, opts, result, otlp_endpoint)
        return result
    if out is None:
        raise ConfigurationError("--out is needed (or --otlp-endpoint with otlp-json)")
    if fmt == "otlp-json":
        from ._otlp import otlp_lines

        lines: Iterator[bytes] = otlp_lines(records, opts, result)
    else:
        lines = _example_lines(records, fmt, opts, result, skip_errors=skip_errors)
    if str(out) == "-":
        _write_all(lines, sys.stdout.buffer, result, fmt, progress)
        sys.stdout.flush()
        return result
    target = Path(out)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb", buffering=_WRITE_BYTES) as handle:
            _write_all(lines, handle, result, fmt, progress)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return result


def _dicts(
    log_dir: str | os.PathLike[str], flt: RecordFilter, stats: ReadStats, *, restore_media: bool
) -> Iterator[dict[str, Any]]:
    # The parsed dicts themselves, so the converters' lookups stay in C; filter adds no Python
    # frame per record.
    records = iter_dicts(
        log_dir,
        flt.since,
        flt.until,
        host=flt.host,
        model=flt.model,
        errors_only=flt.errors_only,
        stats=stats,
        restore_media=restore_media,
    )
    if flt.exclude_errors or flt.meta or flt.finish_reason is not None:
        return filter(flt.matches, records)
    return records


def _write_all(
    lines: Iterator[bytes], handle: IO[bytes], result: ExportResult, fmt: str, progress: bool
) -> None:
    """Write `lines` (which count themselves in `result.written`) to `handle`."""
    bar, tick = _progress(progress)
    if bar is None:
        handle.writelines(lines)  # the handle's buffer gathers them: no Python loop per line
        return
    every = 1 if fmt == "otlp-json" else 1024  # an otlp-json line holds up to 512 spans
    with bar:
        for index, line in enumerate(lines):
            handle.write(line)
            if not index % every:
                tick(result.read.records)
