"""What a request body says, read from its bytes: which API it calls and with what; and
which earlier attempt a retried request repeats.

Pure functions shared by the doors that see HTTP rather than Python arguments (the SDK
transports and the logging proxy). The record they lead to has the fields the middleware's own
methods write for the same call: `endpoint` is the path after `/v1/`, the main input is under
`messages`, `prompt` or `input`, and every other body field is in `parameters`.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import orjson

__all__ = [
    "RequestFacts",
    "RetryLinks",
    "decode_body",
    "endpoint_of",
]

# endpoint -> (payload key, body field(s) that form the payload). A tuple of fields makes the
# payload an object of those fields (rerank, score), as the middleware's methods record them.
_ROUTES: dict[str, tuple[str, str | tuple[str, ...]]] = {
    "chat/completions": ("messages", "messages"),
    "completions": ("prompt", "prompt"),
    "embeddings": ("input", "input"),
    "responses": ("input", "input"),
    "rerank": ("input", ("query", "documents")),
    "score": ("input", ("queries", "documents")),
    "detokenize": ("input", "tokens"),
}
_AUDIO = frozenset({"audio/transcriptions", "audio/translations"})
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_MAX_LINKS = 1024  # failed attempts remembered for their retries
_DISPOSITION_FIELD = re.compile(rb'\b(name|filename)="((?:[^"\\]|\\.)*)"', re.IGNORECASE)


class RequestFacts(NamedTuple):
    """What `Recorder.start` needs to know about one request."""

    endpoint: str
    payload_key: str
    payload: Any
    model: str | None
    params: dict[str, Any]
    client_request_id: Any  # the body's `request_id`, if any (the X-Request-Id header wins)


# tuple.__new__ directly: the NamedTuple's own __new__ is a Python-level frame per call.
_new = cast("Callable[[type[RequestFacts], tuple[Any, ...]], RequestFacts]", tuple.__new__)


def endpoint_of(path: str) -> str:
    """The record's `endpoint` for a URL path: what follows `/v1/` (vLLM's OpenAI API prefix,
    wherever the base URL puts it), else the path without its leading slash."""
    start = path.find("/v1/")
    return path[start + 4 :] if start >= 0 else path.lstrip("/")


def decode_body(endpoint: str, content_type: str, body: bytes) -> RequestFacts:
    """The record's view of a request body; never raises (bad bodies are recorded as sent)."""
    if endpoint in _AUDIO and content_type.startswith("multipart/form-data"):
        return _audio_facts(endpoint, content_type, body)
    if not body:
        return _new(RequestFacts, (endpoint, "input", None, None, {}, None))
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _new(RequestFacts, (endpoint, "input", _opaque(content_type, body), None, {}, None))
    if not isinstance(parsed, dict):
        return _new(RequestFacts, (endpoint, "input", parsed, None, {}, None))
    model = parsed.get("model")
    if not isinstance(model, str):
        model = None
    rid = parsed.get("request_id")
    route = _ROUTES.get(endpoint)
    if route is None and endpoint == "tokenize":
        route = ("messages", "messages") if "messages" in parsed else ("prompt", "prompt")
    if route is None:  # anything else: the whole body is the input, as `request()` records it
        return _new(RequestFacts, (endpoint, "input", parsed, model, {}, rid))
    key, fields = route
    params = parsed  # parsed here, so ours to take the model and the payload out of
    params.pop("model", None)
    if isinstance(fields, str):
        payload = params.pop(fields, None)
    else:
        payload = {field: params.pop(field, None) for field in fields}
    return _new(RequestFacts, (endpoint, key, payload, model, params, rid))


def _opaque(content_type: str, body: bytes) -> Any:
    """A body that is not JSON: its text when it is UTF-8, else its size and hash."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        digest = hashlib.sha256(body).hexdigest()
        return {"content_type": content_type or None, "bytes": len(body), "sha256": digest}


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str | None, str, bytes]]:
    """(name, file name, content type, data) of each part of a multipart/form-data body."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return []
    delimiter = b"--" + found.group(1).encode("latin-1")
    parts = []
    for raw in body.split(delimiter)[1:]:
        if raw.startswith(b"--"):  # the closing delimiter
            break
        head, sep, data = raw.partition(b"\r\n\r\n")
        if not sep:
            continue
        fields = {m.group(1).lower(): m.group(2) for m in _DISPOSITION_FIELD.finditer(head)}
        name = fields.get(b"name")
        if name is None:
            continue
        filename = fields.get(b"filename")
        part_type = ""
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-type:"):
                part_type = line[13:].strip().decode("latin-1")
        parts.append(
            (
                name.decode("utf-8", "replace"),
                None if filename is None else filename.decode("utf-8", "replace"),
                part_type,
                data.removesuffix(b"\r\n"),
            )
        )
    return parts


def _audio_facts(endpoint: str, content_type: str, body: bytes) -> RequestFacts:
    """An audio upload: the file becomes an `input_audio` message part (so the media policy
    stores it like any other blob), the other form fields are the parameters."""
    params: dict[str, Any] = {}
    messages: list[dict[str, Any]] = []
    model: str | None = None
    for name, filename, part_type, data in _multipart(content_type, body):
        if filename is not None:
            mime = part_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
            extension = mimetypes.guess_extension(mime) or "." + filename.rpartition(".")[2]
            audio = {"data": base64.b64encode(data).decode(), "format": extension[1:] or "bin"}
            part = {"type": "input_audio", "input_audio": audio}
            messages.append({"role": "user", "content": [part]})
        elif name == "model":
            model = data.decode("utf-8", "replace")
        else:
            params[name] = data.decode("utf-8", "replace")
    return RequestFacts(endpoint, "messages", messages, model, params, None)


class RetryLinks:
    """Links the attempts of one call the SDK retries: each attempt is a record, and they share
    `retry_group` (the first attempt's request_id, or the Idempotency-Key when one is sent).

    The SDK sends no id common to its attempts (only the attempt number), so an attempt that
    failed in a way that is retried leaves its (endpoint, body) here, and the next attempt with
    the same body takes the group from it. Successful calls never pay for this.
    """

    __slots__ = ("_groups", "_lock")

    def __init__(self) -> None:
        self._groups: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, key: tuple[str, bytes], group: str) -> None:
        with self._lock:  # the doors' threads share it (only failed attempts get here)
            groups = self._groups
            groups[key] = group
            groups.move_to_end(key)
            while len(groups) > _MAX_LINKS:
                groups.popitem(last=False)

    def take(self, key: tuple[str, bytes]) -> str | None:
        return self._groups.pop(key, None)
