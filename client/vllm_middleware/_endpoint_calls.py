"""vLLM's endpoints beyond chat and completions, before any I/O: shared by the async and the
sync client.

Each public function here is one endpoint method as the caller sees it (its signature and
docstring become `VLLMMiddleware.<name>` and `SyncVLLMMiddleware.<name>`, see `adopt`): it
turns the arguments into an `EndpointCall`, which says what the record starts with and what
is sent. `outgoing` builds the HTTP request of a call and `reply_transform` what its record
keeps of the answer; only the sending (awaited or blocking) differs between the two clients,
so both write the same record for the same traffic.

Each call writes one record with the same fields as a chat call; `endpoint` says which API it
was, the main input is the record's `input` (or `messages` / `prompt` where the API has
those), and every other body field is in `parameters`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import mimetypes
import os
import struct
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import httpx

from ._call import JSON_HEADERS, SSE_HEADERS, encode_body
from ._http import absolute_url
from ._recorder import Call

__all__ = [
    "ACCEPT_JSON",
    "AudioFile",
    "EndpointCall",
    "Outgoing",
    "adopt",
    "detokenize",
    "embedding_summary",
    "embeddings",
    "health_url",
    "outgoing",
    "reply_transform",
    "request",
    "rerank",
    "responses",
    "score",
    "summarize_embeddings",
    "tokenize",
    "transcriptions",
]

T = TypeVar("T")
AudioFile = bytes | str | os.PathLike[str] | tuple[str, bytes] | tuple[str, bytes, str]
ACCEPT_JSON = {"accept": "application/json"}
# endpoint, payload key, payload, model, parameters, metadata, headers: what a record starts with
Facts = tuple[
    str, str, Any, str | None, dict[str, Any], Mapping[str, Any] | None, Mapping[str, str] | None
]


@dataclass(frozen=True, slots=True)
class EndpointCall(Generic[T]):
    """One endpoint call before any I/O; `T` is what the caller gets back (the server's JSON)."""

    endpoint: str
    payload_key: str  # the record's field for the main input
    payload: Any
    model: str | None
    params: dict[str, Any]  # the record's `parameters`
    metadata: Mapping[str, Any] | None
    headers: Mapping[str, str] | None
    json: Any = None  # the JSON body, without `model`
    multipart: dict[str, Any] | None = None  # httpx's `files` and `data`, instead of JSON
    root: bool = False  # the path is at the server root (beside /v1), not under base_url
    method: str = "POST"
    include_model: bool = True  # `model` is added to a JSON object body
    body_bytes: int | None = None  # the request size the record states, when not JSON
    summarize: bool = False  # embedding vectors: kept as size and hash unless stored
    store_embeddings: bool | None = None  # per call; None: the client's setting
    stream: bool = False

    @property
    def facts(self) -> Facts:
        """What the record starts with: the arguments of a client's `_begin`."""
        return (
            self.endpoint,
            self.payload_key,
            self.payload,
            self.model,
            self.params,
            self.metadata,
            self.headers,
        )


class Outgoing(NamedTuple):
    """The HTTP request of an `EndpointCall`: `options` are httpx's content or files/data."""

    method: str
    url: httpx.URL | str
    headers: dict[str, str]
    options: dict[str, Any]


@functools.lru_cache(maxsize=256)
def _url(base_url: str, endpoint: str, root: bool) -> httpx.URL | str:
    """The absolute URL, parsed once (httpx parses a string on every request)."""
    if root and base_url.endswith("/v1"):
        base_url = base_url[:-3]
    return absolute_url(base_url, endpoint)


def health_url(base_url: str) -> httpx.URL | str:
    """vLLM's /health, at the server root."""
    return _url(base_url, "health", True)


def outgoing(call: EndpointCall[Any], record: Call, started: float, base_url: str) -> Outgoing:
    """The request to send for `call`. A JSON body that cannot be encoded is recorded on
    `record` and raised (`InvalidRequestError`)."""
    url = _url(base_url, call.endpoint, call.root)
    body = call.json
    if call.include_model and call.model is not None and isinstance(body, dict):
        body = {**body, "model": call.model}
    if call.stream:
        content = encode_body(record, started, body, stream=True)
        return Outgoing("POST", url, {**SSE_HEADERS, **(call.headers or {})}, {"content": content})
    multipart = call.multipart
    headers = dict(ACCEPT_JSON if multipart is not None else JSON_HEADERS)
    if multipart is not None:
        # Named here so a client default of application/json cannot replace it (httpx takes
        # the boundary from this header).
        headers["content-type"] = f"multipart/form-data; boundary={os.urandom(16).hex()}"
    if call.headers:
        headers.update(call.headers)
    options: dict[str, Any] = dict(multipart or {})
    if multipart is None and body is not None:
        options["content"] = encode_body(record, started, body)
    elif call.body_bytes is not None:
        record.body_bytes = call.body_bytes
    if body is None and multipart is None:
        headers.pop("content-type", None)
    return Outgoing(call.method, url, headers, options)


def reply_transform(
    call: EndpointCall[Any], store_embeddings: bool, recording: bool
) -> Callable[[Any], Any] | None:
    """What the record keeps of the answer (None: the answer as it came), given the client's
    `store_embeddings` setting; nothing to compute when the client writes no records."""
    if not (call.summarize and recording):
        return None
    store = store_embeddings if call.store_embeddings is None else call.store_embeddings
    return None if store else summarize_embeddings


def adopt(door: Callable[..., Any], build: Callable[..., EndpointCall[Any]]) -> None:
    """Give `door`, one client's method sending what `build` prepares, the name, docstring and
    signature (with `self`, returning what the call answers) of `build`."""
    signature = inspect.signature(build)
    answer = signature.return_annotation
    if isinstance(answer, str) and answer.startswith("EndpointCall["):
        answer = answer[len("EndpointCall[") : -1]
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    door.__name__ = door.__qualname__ = build.__name__
    door.__doc__ = build.__doc__
    door.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[this, *signature.parameters.values()], return_annotation=answer
    )


# -- embeddings ---------------------------------------------------------------------------------
def embedding_summary(vector: Any) -> Any:
    """What a record keeps of one embedding by default: its size and a hash of its float32
    little-endian bytes (the same for a float list and vLLM's base64 form of it)."""
    if isinstance(vector, str):
        try:
            raw = base64.b64decode(vector, validate=True)
        except ValueError:
            return vector
        return {"dimensions": len(raw) // 4, "sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(vector, list):
        try:
            # (struct packs a float list about twice as fast as array("f") converts it.)
            raw = struct.pack(f"<{len(vector)}f", *vector)
        except OverflowError:  # beyond float32: infinite, as the server's float32 would be
            raw = array("f", vector).tobytes()
        except struct.error:
            return vector
        return {"dimensions": len(vector), "sha256": hashlib.sha256(raw).hexdigest()}
    return vector


def summarize_embeddings(response: Any) -> Any:
    """An embeddings answer with each vector replaced by its size and hash (the default: the
    vectors can be far larger than the rest of the record)."""
    data = response.get("data") if isinstance(response, dict) else None
    if not isinstance(data, list):
        return response
    items = [
        {**item, "embedding": embedding_summary(item["embedding"])}
        if isinstance(item, dict) and "embedding" in item
        else item
        for item in data
    ]
    return {**response, "data": items}


# -- the endpoints (each one a client method; see `adopt`) --------------------------------------
def embeddings(
    input: str | list[Any],  # noqa: A002 - the API's (and the openai SDK's) name
    model: str | None = None,
    *,
    store_embeddings: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> EndpointCall[dict[str, Any]]:
    """POST /embeddings; returns the server's JSON with the vectors as sent.

    The record keeps each vector's size and a hash unless `store_embeddings` (this call's, or
    the client's attribute of that name) is true.
    """
    return EndpointCall(
        "embeddings",
        "input",
        input,
        model,
        extra,
        metadata,
        headers,
        json={**extra, "input": input},
        summarize=True,
        store_embeddings=store_embeddings,
    )


def rerank(
    query: Any,
    documents: list[Any],
    model: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> EndpointCall[dict[str, Any]]:
    """POST /rerank (vLLM's, Jina/Cohere-style): documents ranked by relevance."""
    payload = {"query": query, "documents": documents}
    body = {**extra, **payload}
    return EndpointCall("rerank", "input", payload, model, extra, metadata, headers, json=body)


def score(
    queries: Any,
    documents: Any,
    model: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> EndpointCall[dict[str, Any]]:
    """POST /score: a relevance score per (query, document) pair (1:1, 1:N or N:N)."""
    payload = {"queries": queries, "documents": documents}
    body = {**extra, **payload}
    return EndpointCall("score", "input", payload, model, extra, metadata, headers, json=body)


def tokenize(
    prompt: str | None = None,
    model: str | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> EndpointCall[dict[str, Any]]:
    """POST /tokenize (at the server root) for a prompt or chat `messages`."""
    key, payload = ("messages", messages) if messages is not None else ("prompt", prompt)
    body = {**extra, key: payload}
    return EndpointCall(
        "tokenize", key, payload, model, extra, metadata, headers, json=body, root=True
    )


def detokenize(
    tokens: list[int],
    model: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> EndpointCall[dict[str, Any]]:
    """POST /detokenize (at the server root)."""
    body = {**extra, "tokens": tokens}
    return EndpointCall(
        "detokenize", "input", tokens, model, extra, metadata, headers, json=body, root=True
    )


def request(
    method: str,
    path: str,
    *,
    json: Any = None,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> EndpointCall[Any]:
    """Any other endpoint: `path` relative to `base_url` (or from the server root when
    it starts with "/"). The JSON body is the record's `input`, the answer its
    `response`; `endpoint` is the path."""
    model = json.get("model") if isinstance(json, dict) else None
    return EndpointCall(
        path.strip("/"),
        "input",
        json,
        model if isinstance(model, str) else None,
        {},
        metadata,
        headers,
        json=json,
        root=path.startswith("/"),
        method=method.upper(),
        include_model=False,
    )


def responses(
    input: Any,  # noqa: A002
    model: str | None = None,
    *,
    stream: bool = False,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> EndpointCall[Any]:
    """POST /responses (the Responses API); each client declares its own stream type."""
    params = dict(extra)
    if stream:
        params["stream"] = True
    body = {**params, "input": input}
    return EndpointCall(
        "responses", "input", input, model, params, metadata, headers, json=body, stream=stream
    )


def _audio(file: AudioFile) -> tuple[str, bytes, str]:
    """(file name, bytes, MIME type) of an audio argument."""
    if isinstance(file, tuple):
        name, data = file[0], file[1]
        mime = file[2] if len(file) > 2 else None
    elif isinstance(file, bytes):
        name, data, mime = "audio.wav", file, None
    else:
        path = Path(file)
        name, data, mime = path.name, path.read_bytes(), None
    guessed = mimetypes.guess_type(name)[0]
    return name, data, str(mime or guessed or "application/octet-stream")


def transcriptions(
    file: AudioFile,
    model: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> EndpointCall[dict[str, Any]]:
    """POST /audio/transcriptions (multipart). The record's `messages` hold the audio as
    an `input_audio` part, so the media policy stores it like any other blob."""
    name, data, mime = _audio(file)
    fields = {key: str(value) for key, value in extra.items() if value is not None}
    if model is not None:
        fields["model"] = model
    audio_format = (mimetypes.guess_extension(mime) or Path(name).suffix or ".bin")[1:]
    encoded = base64.b64encode(data).decode()
    part = {"type": "input_audio", "input_audio": {"data": encoded, "format": audio_format}}
    return EndpointCall(
        "audio/transcriptions",
        "messages",
        [{"role": "user", "content": [part]}],
        model,
        dict(extra),
        metadata,
        headers,
        multipart={"files": {"file": (name, data, mime)}, "data": fields},
        body_bytes=len(encoded),
    )
