"""The rest of vLLM's API surface for `VLLMMiddleware`, recorded like chat and completions.

`Endpoints` is mixed into `VLLMMiddleware`: embeddings, the Responses API (plain and streamed),
rerank and score, tokenize and detokenize, audio transcriptions and a generic `request`, and
the control-plane `models` and `health` (which write no record). What each call sends and
records is `_endpoint_calls`' (shared with `SyncVLLMMiddleware`); this module awaits it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

import httpx

from . import _endpoint_calls as calls
from ._call import json_reply, send_logged
from ._endpoint_calls import ACCEPT_JSON, EndpointCall, adopt, outgoing, reply_transform
from ._http import control_reply, exception_from_transport, exception_from_unsendable
from ._responses_reassembly import ResponsesAccumulator
from ._streaming import AsyncStream

if TYPE_CHECKING:
    from ._client import VLLMMiddleware

__all__ = ["AsyncAudio", "Endpoints"]

P = ParamSpec("P")
T = TypeVar("T")


def _door(build: Callable[P, EndpointCall[T]]) -> Callable[Concatenate[Any, P], Awaitable[T]]:
    """The async method for an endpoint of `_endpoint_calls` (its signature and docstring)."""

    async def door(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._send_recorded(build(*args, **kwargs))  # type: ignore[no-any-return]

    adopt(door, build)
    return door


class AsyncAudio:
    """`client.audio`: the audio endpoints, named as in the openai SDK."""

    def __init__(self, send: Callable[[EndpointCall[Any]], Awaitable[Any]]) -> None:
        self._send_recorded = send

    transcriptions = _door(calls.transcriptions)


class Endpoints:
    """vLLM's other endpoints; mixed into `VLLMMiddleware` (see the module docstring)."""

    # Embedding vectors can be large: records keep their size and a hash unless this is set
    # (per client, or per call with `store_embeddings=`).
    store_embeddings: bool = False

    embeddings = _door(calls.embeddings)
    rerank = _door(calls.rerank)
    score = _door(calls.score)
    tokenize = _door(calls.tokenize)
    detokenize = _door(calls.detokenize)
    request = _door(calls.request)

    @property
    def audio(self) -> AsyncAudio:
        return AsyncAudio(self._send_recorded)

    async def models(self) -> dict[str, Any]:
        """GET /models: the served models, as the server's JSON.

        Like `health`, a control-plane call: it is not traffic and writes no record.
        """
        client: VLLMMiddleware = self  # type: ignore[assignment]
        if asyncio.get_running_loop() is not client._loop:
            client._enter_loop()
        url = client._urls["models"]
        try:
            response = await client._http.get(url, headers=ACCEPT_JSON)
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
        try:
            response = await client._http.get(calls.health_url(client.base_url), timeout=timeout)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError):
            return False
        return response.status_code == 200

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
        call = calls.responses(
            input, model, stream=stream, metadata=metadata, headers=headers, **extra
        )
        if stream:
            return await self._open_event_stream(call)
        return await self._send_recorded(call)

    # -- plumbing -----------------------------------------------------------------------------
    async def _send_recorded(self, call: EndpointCall[T]) -> T:
        """`_endpoint_exchange`, waiting for the record to be durable when the client says so."""
        client: VLLMMiddleware = self  # type: ignore[assignment]
        exchange = self._endpoint_exchange(call)
        if client._durable:
            return await client._wait_durable(exchange)
        return await exchange

    async def _endpoint_exchange(self, call: EndpointCall[T]) -> T:
        """One non-streaming exchange and its record (logged whatever happens)."""
        client: VLLMMiddleware = self  # type: ignore[assignment]
        started = time.perf_counter()
        record = client._start(*call.facts)
        method, url, headers, options = outgoing(call, record, started, client.base_url)
        sending = client._http.request(method, url, headers=headers, **options)
        response = await send_logged(record, started, url, sending)
        transform = reply_transform(call, self.store_embeddings, client._sink is not None)
        return json_reply(record, started, response, transform, allow_empty=True)  # type: ignore[no-any-return]

    async def _open_event_stream(self, call: EndpointCall[Any]) -> AsyncStream:
        """A streamed Responses call: its typed events, folded into one record."""
        client: VLLMMiddleware = self  # type: ignore[assignment]
        started = time.perf_counter()
        record = client._start(*call.facts)
        _, url, headers, options = outgoing(call, record, started, client.base_url)
        acc = ResponsesAccumulator(started)
        return await client._send_stream(record, started, url, options["content"], headers, acc=acc)
