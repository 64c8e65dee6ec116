"""`CaptureTransport` and `AsyncCaptureTransport` for httpx2 clients (openai 3.x, and
any code that builds its own `httpx2.Client`). See `_transport_logic` for what they do."""

from __future__ import annotations

from typing import Any

import httpx2

from ._recorder import Recorder
from ._transport_logic import (
    AsyncBodyLogic,
    AsyncTransportLogic,
    SyncBodyLogic,
    SyncTransportLogic,
)

__all__ = ["AsyncCaptureTransport", "CaptureTransport"]

_TIMEOUTS = (httpx2.TimeoutException,)


class _SyncBody(SyncBodyLogic, httpx2.SyncByteStream):
    timeouts = _TIMEOUTS


class _AsyncBody(AsyncBodyLogic, httpx2.AsyncByteStream):
    timeouts = _TIMEOUTS


class CaptureTransport(SyncTransportLogic, httpx2.BaseTransport):
    """An httpx2 transport that records every exchange it carries (one record each).

    ``httpx2.Client(transport=CaptureTransport(log_dir="./logs/vllm"))``: `transport` is the
    transport that sends (httpx2's default, with its pool limits, proxies and TLS, when None);
    the other keywords are `VLLMMiddleware`'s logging options, or pass a `recorder`.
    `store_embeddings` keeps embedding vectors in the records (default: size and hash).
    """

    timeouts = _TIMEOUTS
    body_class = _SyncBody

    def __init__(
        self,
        transport: httpx2.BaseTransport | None = None,
        *,
        recorder: Recorder | None = None,
        store_embeddings: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(transport or httpx2.HTTPTransport(), recorder, store_embeddings, options)


class AsyncCaptureTransport(AsyncTransportLogic, httpx2.AsyncBaseTransport):
    """`CaptureTransport` for `httpx2.AsyncClient` (what `AsyncOpenAI` uses in openai 3)."""

    timeouts = _TIMEOUTS
    body_class = _AsyncBody

    def __init__(
        self,
        transport: httpx2.AsyncBaseTransport | None = None,
        *,
        recorder: Recorder | None = None,
        store_embeddings: bool = False,
        **options: Any,
    ) -> None:
        transport = transport or httpx2.AsyncHTTPTransport()
        super().__init__(transport, recorder, store_embeddings, options)
