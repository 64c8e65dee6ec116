"""`CaptureTransport` and `AsyncCaptureTransport` for httpx clients (openai 1.x and 2.x, and
any code that builds its own `httpx.Client`). See `_transport_logic` for what they do."""

from __future__ import annotations

from typing import Any

import httpx

from ._recorder import Recorder
from ._transport_logic import (
    AsyncBodyLogic,
    AsyncTransportLogic,
    SyncBodyLogic,
    SyncTransportLogic,
)

__all__ = ["AsyncCaptureTransport", "CaptureTransport"]

_TIMEOUTS = (httpx.TimeoutException,)


class _SyncBody(SyncBodyLogic, httpx.SyncByteStream):
    timeouts = _TIMEOUTS


class _AsyncBody(AsyncBodyLogic, httpx.AsyncByteStream):
    timeouts = _TIMEOUTS


class CaptureTransport(SyncTransportLogic, httpx.BaseTransport):
    """An httpx transport that records every exchange it carries (one record each).

    ``httpx.Client(transport=CaptureTransport(log_dir="./logs/vllm"))``: `transport` is the
    transport that sends (httpx's default, with its pool limits, proxies and TLS, when None);
    the other keywords are `VLLMMiddleware`'s logging options, or pass a `recorder`.
    `store_embeddings` keeps embedding vectors in the records (default: size and hash).
    """

    timeouts = _TIMEOUTS
    body_class = _SyncBody

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        recorder: Recorder | None = None,
        store_embeddings: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(transport or httpx.HTTPTransport(), recorder, store_embeddings, options)


class AsyncCaptureTransport(AsyncTransportLogic, httpx.AsyncBaseTransport):
    """`CaptureTransport` for `httpx.AsyncClient`."""

    timeouts = _TIMEOUTS
    body_class = _AsyncBody

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        recorder: Recorder | None = None,
        store_embeddings: bool = False,
        **options: Any,
    ) -> None:
        transport = transport or httpx.AsyncHTTPTransport()
        super().__init__(transport, recorder, store_embeddings, options)
