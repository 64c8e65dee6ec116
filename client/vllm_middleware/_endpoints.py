"""The rest of vLLM's API surface, recorded like chat and completions.

`Endpoints` is mixed into `VLLMMiddleware`: embeddings, the Responses API (plain and streamed),
rerank and score, tokenize and detokenize, audio transcriptions and a generic `request`, and
the control-plane `models` and `health` (which write no record). Each other call writes one
record with the same fields as a chat call; `endpoint` says which API it was, the main input
is the record's `input` (or `messages` / `prompt` where the API has those), and every other
body field is in `parameters`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import mimetypes
import os
import time
from array import array
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from ._call import JSON_HEADERS, SSE_HEADERS, encode_body, json_reply, send_logged
from ._http import control_reply, exception_from_transport, exception_from_unsendable
from ._responses_reassembly import ResponsesAccumulator
from ._streaming import AsyncStream

if TYPE_CHECKING:
    from ._client import VLLMMiddleware

__all__ = ["AudioFile", "Endpoints", "embedding_summary"]

AudioFile = bytes | str | os.PathLike[str] | tuple[str, bytes] | tuple[str, bytes, str]
_ACCEPT_JSON = {"accept": "application/json"}


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
            raw = array("f", vector).tobytes()
        except TypeError:
            return vector
        if array("f").itemsize != 4:  # pragma: no cover - every CPython platform has 4
            return vector
        return {"dimensions": len(vector), "sha256": hashlib.sha256(raw).hexdigest()}
    return vector


def _summarized(response: Any) -> Any:
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


class _Audio:
    """`client.audio`: the audio endpoints, named as in the openai SDK."""

    def __init__(self, send: Callable[..., Awaitable[dict[str, Any]]]) -> None:
        self._send = send

    async def transcriptions(
        self,
        file: AudioFile,
        model: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /audio/transcriptions (multipart). The record's `messages` hold the audio as
        an `input_audio` part, so the media policy stores it like any other blob."""
        name, data, mime = _audio(file)
        fields = {key: str(value) for key, value in extra.items() if value is not None}
        if model is not None:
            fields["model"] = model
        audio_format = (mimetypes.guess_extension(mime) or Path(name).suffix or ".bin")[1:]
        encoded = base64.b64encode(data).decode()
        part = {"type": "input_audio", "input_audio": {"data": encoded, "format": audio_format}}
        messages = [{"role": "user", "content": [part]}]
        files = {"file": (name, data, mime)}
        return await self._send(
            "audio/transcriptions",
            "messages",
            messages,
            model,
            dict(extra),
            metadata,
            headers,
            request={"files": files, "data": fields},
            body_bytes=len(encoded),
        )


class Endpoints:
    """vLLM's other endpoints; mixed into `VLLMMiddleware` (see the module docstring)."""

    # Embedding vectors can be large: records keep their size and a hash unless this is set
    # (per client, or per call with `store_embeddings=`).
    store_embeddings: bool = False

    @property
    def audio(self) -> _Audio:
        return _Audio(self._send_recorded)

    async def models(self) -> dict[str, Any]:
        """GET /models: the served models, as the server's JSON.

        Like `health`, a control-plane call: it is not traffic and writes no record.
        """
        client: VLLMMiddleware = self  # type: ignore[assignment]
        if asyncio.get_running_loop() is not client._loop:
            client._enter_loop()
        url = client._urls["models"]
        try:
            response = await client._http.get(url, headers=_ACCEPT_JSON)
        except httpx.HTTPError as exc:
            raise exception_from_transport(exc, "models") from exc
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise exception_from_unsendable(exc, url, None) from exc
        return control_reply(response, "models")  # type: ignore[no-any-return]

    async def health(self, timeout: float = 5.0) -> bool:
        """GET /health (at the server root, beside /v1): True when the server answers 200.

        Never raises for an unreachable or failing server; writes no record.
        """
        client: VLLMMiddleware = self  # type: ignore[assignment]
        if asyncio.get_running_loop() is not client._loop:
            client._enter_loop()
        root = client.base_url[:-3] if client.base_url.endswith("/v1") else client.base_url
        try:
            response = await client._http.get(f"{root}/health", timeout=timeout)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError):
            return False
        return response.status_code == 200

    async def embeddings(
        self,
        input: str | list[Any],  # noqa: A002 - the API's (and the openai SDK's) name
        model: str | None = None,
        *,
        store_embeddings: bool | None = None,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /embeddings; returns the server's JSON with the vectors as sent."""
        store = self.store_embeddings if store_embeddings is None else store_embeddings
        body = {**extra, "input": input}
        return await self._send_recorded(
            "embeddings",
            "input",
            input,
            model,
            extra,
            metadata,
            headers,
            json=body,
            transform=None if store else _summarized,
        )

    async def rerank(
        self,
        query: Any,
        documents: list[Any],
        model: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /rerank (vLLM's, Jina/Cohere-style): documents ranked by relevance."""
        payload = {"query": query, "documents": documents}
        body = {**extra, **payload}
        return await self._send_recorded(
            "rerank", "input", payload, model, extra, metadata, headers, json=body
        )

    async def score(
        self,
        queries: Any,
        documents: Any,
        model: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /score: a relevance score per (query, document) pair (1:1, 1:N or N:N)."""
        payload = {"queries": queries, "documents": documents}
        body = {**extra, **payload}
        return await self._send_recorded(
            "score", "input", payload, model, extra, metadata, headers, json=body
        )

    async def tokenize(
        self,
        prompt: str | None = None,
        model: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /tokenize (at the server root) for a prompt or chat `messages`."""
        key, payload = ("messages", messages) if messages is not None else ("prompt", prompt)
        body = {**extra, key: payload}
        return await self._send_recorded(
            "tokenize", key, payload, model, extra, metadata, headers, json=body, root=True
        )

    async def detokenize(
        self,
        tokens: list[int],
        model: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """POST /detokenize (at the server root)."""
        body = {**extra, "tokens": tokens}
        return await self._send_recorded(
            "detokenize", "input", tokens, model, extra, metadata, headers, json=body, root=True
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Any other endpoint: `path` relative to `base_url` (or from the server root when
        it starts with "/"). The JSON body is the record's `input`, the answer its
        `response`; `endpoint` is the path."""
        root = path.startswith("/")
        endpoint = path.strip("/")
        model = json.get("model") if isinstance(json, dict) else None
        return await self._send_recorded(
            endpoint,
            "input",
            json,
            model if isinstance(model, str) else None,
            {},
            metadata,
            headers,
            json=json,
            root=root,
            method=method.upper(),
            include_model=False,
        )

    @overload
    async def responses(
        self,
        input: Any,
        model: str | None = None,
        *,
        stream: Literal[False] = False,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]: ...

    @overload
    async def responses(
        self,
        input: Any,
        model: str | None = None,
        *,
        stream: Literal[True],
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> AsyncStream: ...

    async def responses(
        self,
        input: Any,  # noqa: A002
        model: str | None = None,
        *,
        stream: bool = False,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any] | AsyncStream:
        """POST /responses (the Responses API). With `stream=True`, an `AsyncStream` of its
        typed events; the record holds the final response object (rebuilt from the events
        when the stream ends early)."""
        params = dict(extra)
        if stream:
            params["stream"] = True
        body = {**params, "input": input}
        if not stream:
            return await self._send_recorded(
                "responses", "input", input, model, params, metadata, headers, json=body
            )
        return await self._open_event_stream(
            "responses", "input", input, model, params, metadata, headers, body
        )

    # -- plumbing -----------------------------------------------------------------------------
    def _url(self, endpoint: str, root: bool) -> str:
        client: VLLMMiddleware = self  # type: ignore[assignment]
        base = client.base_url
        if root and base.endswith("/v1"):
            base = base[:-3]
        return f"{base}/{endpoint}"

    async def _send_recorded(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """`_exchange`, waiting for the record to be durable when the client says so.

        (The answer is the server's JSON; `request` may return any JSON value.)"""
        client: VLLMMiddleware = self  # type: ignore[assignment]
        exchange = self._exchange(*args, **kwargs)
        if client._durable:
            return await client._wait_durable(exchange)
        return await exchange  # type: ignore[no-any-return]

    async def _exchange(
        self,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        *,
        json: Any = None,
        request: dict[str, Any] | None = None,
        transform: Any = None,
        root: bool = False,
        method: str = "POST",
        include_model: bool = True,
        body_bytes: int | None = None,
    ) -> Any:
        """One non-streaming exchange and its record (logged whatever happens)."""
        client: VLLMMiddleware = self  # type: ignore[assignment]
        started = time.perf_counter()
        call = client._start(endpoint, payload_key, payload, model, params, metadata, headers)
        send_headers: dict[str, str] = dict(_ACCEPT_JSON if request is not None else JSON_HEADERS)
        if request is not None:
            # Named here so a client default of application/json cannot replace it (httpx
            # takes the boundary from this header).
            send_headers["content-type"] = f"multipart/form-data; boundary={os.urandom(16).hex()}"
        if headers:
            send_headers.update(headers)
        kwargs: dict[str, Any] = dict(request or {})
        if request is None and json is not None:
            if include_model and model is not None and isinstance(json, dict):
                json = {**json, "model": model}
            kwargs["content"] = encode_body(call, started, json)
        elif body_bytes is not None:
            call.body_bytes = body_bytes
        if json is None and request is None:
            send_headers.pop("content-type", None)
        url = self._url(endpoint, root)
        sending = client._http.request(method, url, headers=send_headers, **kwargs)
        response = await send_logged(call, started, url, sending)
        return json_reply(call, started, response, transform, allow_empty=True)

    async def _open_event_stream(
        self,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        body: dict[str, Any],
    ) -> AsyncStream:
        client: VLLMMiddleware = self  # type: ignore[assignment]
        started = time.perf_counter()
        call = client._start(endpoint, payload_key, payload, model, params, metadata, headers)
        if model is not None:
            body = {**body, "model": model}
        content = encode_body(call, started, body, stream=True)
        send_headers = {**SSE_HEADERS, **(headers or {})}
        url = self._url(endpoint, False)
        return await client._send_stream(
            call, started, url, content, send_headers, acc=ResponsesAccumulator(started)
        )
