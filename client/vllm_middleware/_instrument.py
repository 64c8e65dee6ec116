"""`instrument(client)`: capture every call an `openai` SDK client makes, without patching it.

The SDK keeps its HTTP client in `client._client` (an `httpx` client in openai 1.x/2.x, an
`httpx2` one in 3.x, or whichever the caller passed as `http_client`). Neither library has a
public way to replace the transport of an existing client, so the transports are swapped in
place: the default one and those mounted for proxies. The SDK, its retries, streams, raw
responses and parsing are left as they are; each sees the server's bytes unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._recorder import Recorder
from ._transport_logic import AsyncTransportLogic, SyncTransportLogic

__all__ = ["instrument"]

_Client = TypeVar("_Client")


def _capture_class(http_client: Any) -> Callable[..., SyncTransportLogic | AsyncTransportLogic]:
    """The capture transport for `http_client`: of its library (httpx or httpx2), sync or
    async as the client is (a transport may offer both, as `MockTransport` does)."""
    if any(cls.__module__.partition(".")[0] == "httpx2" for cls in type(http_client).__mro__):
        import httpx2

        from . import httpx2 as capture2

        if isinstance(http_client, httpx2.AsyncClient):
            return capture2.AsyncCaptureTransport
        return capture2.CaptureTransport
    import httpx

    from . import _capture_transport as capture

    if isinstance(http_client, httpx.AsyncClient):
        return capture.AsyncCaptureTransport
    return capture.CaptureTransport


def instrument(
    client: _Client,
    *,
    recorder: Recorder | None = None,
    store_embeddings: bool = False,
    **options: Any,
) -> _Client:
    """Record every call `client` (an `openai.OpenAI` or `openai.AsyncOpenAI`) makes.

    Returns the same client, its HTTP client's transport wrapped: pool limits, proxies and TLS
    are kept. `options` are `VLLMMiddleware`'s logging keywords (`log_dir`, `redis_url`,
    `host`, `metadata`, ...); `store_embeddings` keeps embedding vectors in the records.
    Closing the SDK client (`client.close()` / `await client.close()`) flushes the records.
    Instrumenting a client twice changes nothing the second time.
    """
    http_client: Any = getattr(client, "_client", None)
    transport = getattr(http_client, "_transport", None)
    if transport is None:
        raise TypeError(
            f"instrument() expects an openai.OpenAI or openai.AsyncOpenAI client "
            f"(with an httpx or httpx2 HTTP client), not {type(client).__name__}"
        )
    if isinstance(transport, SyncTransportLogic | AsyncTransportLogic):
        return client
    capture_class = _capture_class(http_client)
    wrapped = capture_class(
        transport, recorder=recorder, store_embeddings=store_embeddings, **options
    )
    shared = wrapped.recorder
    http_client._transport = wrapped
    mounts = getattr(http_client, "_mounts", None)
    if isinstance(mounts, dict):
        for pattern, mounted in list(mounts.items()):
            if mounted is not None and not isinstance(
                mounted, SyncTransportLogic | AsyncTransportLogic
            ):
                mounts[pattern] = capture_class(
                    mounted, recorder=shared, store_embeddings=store_embeddings
                )
    return client
