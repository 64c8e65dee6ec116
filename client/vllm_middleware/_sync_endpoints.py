"""The rest of vLLM's API surface for `SyncVLLMMiddleware`, and the blocking sending that its
chat and completions calls share.

`SyncEndpoints` sits between `ClientBase` and `SyncVLLMMiddleware`: the methods of
`VLLMMiddleware`'s `Endpoints` (the same signatures and docstrings, from `_endpoint_calls`),
without `await`, writing the same records.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, overload

import httpx

from . import _endpoint_calls as calls
from ._call import json_reply
from ._client_base import ClientBase
from ._endpoint_calls import ACCEPT_JSON, EndpointCall, adopt, outgoing, reply_transform
from ._exceptions import APIError, InvalidRequestError
from ._http import control_reply, exception_from_transport, exception_from_unsendable
from ._recorder import Call
from ._responses_reassembly import ResponsesAccumulator
from ._stream_core import Accumulator, StreamEnd, log_unstarted
from ._sync_streaming import Stream, SyncStreamState, fail_before_sync_stream

__all__ = ["SEND_ERRORS", "SyncAudio", "SyncEndpoints", "unanswered"]

P = ParamSpec("P")
T = TypeVar("T")
# What the HTTP layer raises for a request that got no response: httpx's own errors, and
# `InvalidURL` / `ValueError` / `TypeError` for a URL or header it cannot send.
SEND_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError)
CANCELLED = "cancelled by the caller before the response"


def _door(build: Callable[P, EndpointCall[T]]) -> Callable[Concatenate[Any, P], T]:
    """The sync method for an endpoint of `_endpoint_calls` (its signature and docstring)."""

    def door(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._send_recorded(build(*args, **kwargs))  # type: ignore[no-any-return]

    adopt(door, build)
    return door


class SyncAudio:
    """`client.audio`: the audio endpoints, named as in the openai SDK."""

    def __init__(self, send: Callable[[EndpointCall[Any]], Any]) -> None:
        self._send_recorded = send

    transcriptions = _door(calls.transcriptions)


class SyncEndpoints(ClientBase):
    """vLLM's other endpoints and the blocking exchange (see the module docstring)."""

    _http: httpx.Client

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
    def audio(self) -> SyncAudio:
        return SyncAudio(self._send_recorded)

    def models(self) -> dict[str, Any]:
        """GET /models: the served models, as the server's JSON.

        Like `health`, a control-plane call: it is not traffic and writes no record.
        """
        url = self._urls["models"]
        try:
            response = self._http.get(url, headers=ACCEPT_JSON)
        except httpx.HTTPError as exc:
            raise exception_from_transport(exc, "models") from exc
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise exception_from_unsendable(exc, url, None) from exc
        return control_reply(response, "models")  # type: ignore[no-any-return]

    def health(self, timeout: float = 5.0) -> bool:
        """GET /health (at the server root, beside /v1): True when the server answers 200.

        Never raises for an unreachable or failing server; writes no record.
        """
        try:
            response = self._http.get(calls.health_url(self.base_url), timeout=timeout)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError):
            return False
        return response.status_code == 200

    @overload
    def responses(
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
    def responses(
        self,
        input: Any,
        model: str | None = None,
        *,
        stream: Literal[True],
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> Stream: ...

    def responses(
        self,
        input: Any,  # noqa: A002
        model: str | None = None,
        *,
        stream: bool = False,
        metadata: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any] | Stream:
        """POST /responses (the Responses API). With `stream=True`, a `Stream` of its
        typed events; the record holds the final response object (rebuilt from the events
        when the stream ends early)."""
        call = calls.responses(
            input, model, stream=stream, metadata=metadata, headers=headers, **extra
        )
        if stream:
            return self._open_event_stream(call)
        return self._send_recorded(call)  # type: ignore[no-any-return]

    # -- plumbing -----------------------------------------------------------------------------
    def _send_recorded(self, call: EndpointCall[T]) -> T:
        """`_endpoint_exchange`, waiting for the record to be durable when the client says so."""
        if self._durable:
            return self._durably(lambda: self._endpoint_exchange(call))
        return self._endpoint_exchange(call)

    def _endpoint_exchange(self, call: EndpointCall[T]) -> T:
        """One non-streaming exchange and its record (logged whatever happens)."""
        started = time.perf_counter()
        record = self._begin(*call.facts)
        method, url, headers, options = outgoing(call, record, started, self.base_url)
        try:
            response = self._http.request(method, url, headers=headers, **options)
        except SEND_ERRORS as exc:
            raise unanswered(record, started, url, exc, stream=False) from exc
        except KeyboardInterrupt:
            record.log(started, error=APIError(CANCELLED))
            raise
        transform = reply_transform(call, self.store_embeddings, self._sink is not None)
        return json_reply(record, started, response, transform, allow_empty=True)  # type: ignore[no-any-return]

    def _durably(self, exchange: Callable[[], T]) -> T:
        """`durable=True`: the call returns (or raises) once its record is in Redis, the spool
        or the files (not when the caller interrupted it)."""
        try:
            result = exchange()
        except KeyboardInterrupt:
            raise
        except BaseException:
            _run_blocking(self._recorder.wait_durable())
            raise
        _run_blocking(self._recorder.wait_durable())
        return result

    def _open_event_stream(self, call: EndpointCall[Any]) -> Stream:
        """A streamed Responses call: its typed events, folded into one record."""
        started = time.perf_counter()
        record = self._begin(*call.facts)
        _, url, headers, options = outgoing(call, record, started, self.base_url)
        acc = ResponsesAccumulator(started)
        return self._send_stream(record, started, url, options["content"], headers, acc=acc)

    def _send_stream(
        self,
        call: Call,
        started: float,
        url: httpx.URL | str,
        content: bytes,
        headers: Mapping[str, str] | None,
        *,
        chat: bool = False,
        hide_usage: bool = False,
        acc: Accumulator | None = None,
    ) -> Stream:
        """Send a streaming request; its record is logged however the stream ends."""
        http = self._http
        try:
            request = http.build_request("POST", url, content=content, headers=headers)
            response = http.send(request, stream=True)
        except SEND_ERRORS as exc:
            raise unanswered(call, started, url, exc, stream=True) from exc
        except KeyboardInterrupt:
            log_unstarted(call, started, APIError(CANCELLED), "cancelled")
            raise
        if response.status_code >= 400:
            fail_before_sync_stream(call, started, response)
        return Stream(
            SyncStreamState(call, started, response, chat=chat, hide_usage=hide_usage, acc=acc)
        )


def unanswered(
    call: Call, started: float, url: httpx.URL | str, exc: Exception, *, stream: bool
) -> APIError | InvalidRequestError:
    """The error for a request that got no response, recorded (a stream's record also says
    how it ended)."""
    error: APIError | InvalidRequestError
    end: StreamEnd
    if isinstance(exc, httpx.HTTPError):
        error, end = exception_from_transport(exc, call.request_id), "disconnected"
    else:
        error, end = exception_from_unsendable(exc, url, call.request_id), "invalid_request"
    if stream:
        log_unstarted(call, started, error, end)
    else:
        call.log(started, error=error)
    return error


def _run_blocking(wait: Coroutine[Any, Any, None]) -> None:
    """Run a recorder wait to its end from sync code, on a loop of its own (in a thread of
    its own if this thread already runs one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(wait)
        return
    worker = threading.Thread(target=asyncio.run, args=(wait,))
    worker.start()
    worker.join()
