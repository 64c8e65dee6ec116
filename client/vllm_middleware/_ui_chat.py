"""A record's page in the viewer: the conversation as chat turns, then its facts and raw JSON.

Every value is escaped. Media are shown only from `data:` URLs (restored from the media store
by the reader); a remote URL is shown as text and never fetched; a reference whose file is
missing is shown as such.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["render_record"]

_SAFE = {"image": "data:image/", "audio": "data:audio/", "video": "data:video/"}
_AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pre(value: Any) -> str:
    text = (
        value
        if isinstance(value, str)
        else orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    )
    return f"<pre>{_esc(text)}</pre>"


def _url_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("url"), str):
        return str(value["url"])
    return None


def _media(kind: str, value: Any) -> str:
    if isinstance(value, dict) and "media_ref" in value:
        ref = value["media_ref"]
        return f'<div class="missing">{kind}: media file not available ({_esc(ref)})</div>'
    url = _url_of(value)
    if url is None:
        return f'<div class="missing">{kind}: {_esc(orjson.dumps(value).decode()[:200])}</div>'
    if not url.startswith(_SAFE.get(kind, "data:")):
        return f'<div class="remote">{kind} (not fetched): <code>{_esc(url[:300])}</code></div>'
    if kind == "image":
        return f'<img class="media" alt="image" src="{_esc(url)}">'
    return f'<{kind} class="media" controls src="{_esc(url)}"></{kind}>'


def _part(part: Any) -> str:
    if isinstance(part, str):
        return f'<div class="text">{_esc(part)}</div>'
    if not isinstance(part, dict):
        return _pre(part)
    kind = part.get("type")
    if isinstance(part.get("text"), str):
        return f'<div class="text">{_esc(part["text"])}</div>'
    if kind == "image_url" or "image_url" in part:
        return _media("image", part.get("image_url"))
    if kind == "input_audio" or "input_audio" in part:
        audio = part.get("input_audio")
        if isinstance(audio, dict) and isinstance(audio.get("data"), str):
            mime = _AUDIO_MIME.get(str(audio.get("format")), "audio/wav")
            return _media("audio", f"data:{mime};base64,{audio['data']}")
        return _media("audio", audio)
    if kind == "audio_url" or "audio_url" in part:
        return _media("audio", part.get("audio_url"))
    if kind == "video_url" or "video_url" in part:
        return _media("video", part.get("video_url"))
    return _pre(part)


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(_part(p) for p in content)
    return _part(content)


def _tool_calls(calls: Any) -> str:
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        try:
            shown = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        except orjson.JSONDecodeError:
            shown = arguments
        out.append(
            f'<div class="tool-call"><span class="tool-name">{_esc(function.get("name"))}</span>'
            f' <span class="tool-id">{_esc(call.get("id"))}</span>{_pre(shown)}</div>'
        )
    return "".join(out)


def _turn(message: Mapping[str, Any], extra_class: str = "") -> str:
    role = str(message.get("role") or "?")
    body = _content(message.get("content"))
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        body = (
            f'<details class="reasoning"><summary>reasoning</summary>{_esc(reasoning)}</details>'
            + body
        )
    body += _tool_calls(message.get("tool_calls"))
    if role == "tool":
        label = f"tool result {_esc(message.get('tool_call_id') or '')}"
    else:
        label = _esc(role)
    audio = message.get("audio")
    data = audio.get("data") if isinstance(audio, dict) else None
    if isinstance(data, str):
        body += _media("audio", f"data:audio/wav;base64,{data}")
    elif isinstance(data, dict):
        body += _media("audio", data)
    return (
        f'<div class="turn role-{_esc(role)} {extra_class}"><div class="role">{label}</div>'
        f'<div class="body">{body or "<em>(no content)</em>"}</div></div>'
    )


def _conversation(record: Mapping[str, Any]) -> str:
    turns = []
    messages = record.get("messages")
    if isinstance(messages, list):
        turns += [_turn(m) for m in messages if isinstance(m, dict)]
    elif record.get("prompt") is not None:
        turns.append(_turn({"role": "prompt", "content": record.get("prompt")}))
    else:
        turns.append('<p class="empty">no prompt recorded (metadata-only or redacted)</p>')
    response = record.get("response")
    choices = response.get("choices") if isinstance(response, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {"role": "completion", "content": choice.get("text")}
        turns.append(_turn(message, "answer"))
    if record.get("error") is not None:
        turns.append(
            f'<div class="turn failed"><div class="role">error</div>'
            f'<div class="body">{_esc(record["error"])}</div></div>'
        )
    return '<div class="chat">' + "".join(turns) + "</div>"


def _facts(record: Mapping[str, Any]) -> str:
    rows = [
        ("request id", record.get("request_id")),
        ("time", record.get("timestamp")),
        ("host", record.get("host")),
        ("model", record.get("model")),
        ("endpoint", record.get("endpoint")),
        ("status", record.get("status_code")),
        ("latency ms", record.get("latency_ms")),
        ("TTFT ms", record.get("ttft_ms")),
        ("stream", record.get("stream")),
        ("stream end", record.get("stream_end")),
        ("chunks", record.get("chunks")),
    ]
    cells = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows if v is not None
    )
    return f'<table class="facts">{cells}</table>'


def render_record(record: Mapping[str, Any]) -> str:
    """The body of a request's page."""
    sections = [
        f'<div class="columns"><div class="main">{_conversation(record)}</div>'
        f"<aside>{_facts(record)}"
    ]
    for title, key in (
        ("usage", "usage"),
        ("parameters", "parameters"),
        ("metadata", "metadata"),
        ("error detail", "error_detail"),
    ):
        value = record.get(key)
        if value:
            sections.append(f"<h3>{title}</h3>{_pre(value)}")
    sections.append("</aside></div>")
    sections.append(
        f'<details class="raw"><summary>raw record</summary>{_pre(dict(record))}</details>'
    )
    return "".join(sections)
