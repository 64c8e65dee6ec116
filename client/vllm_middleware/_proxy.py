"""The logging proxy's ASGI app: every request passed to an upstream, recorded on the way.

Capture is not done here: traffic goes out through an httpx transport that records it (the
`AsyncCaptureTransport` the openai SDK door uses too, so both doors write the same records),
while listing models and health checks go through the plain transport underneath it. The app
only moves bytes: the client's request (minus hop-by-hop headers) to the upstream, and the
upstream's status, headers and body back, each body chunk sent on as soon as it arrives.

A client that goes away cancels the upstream request: a watcher waits for the ASGI
`http.disconnect` and cancels the request's task, so the capture sees the read cancelled and
records the stream as such. An upstream that cannot be reached gets a 502 (504 on a timeout)
in OpenAI's error format; one that dies mid-body has the client's connection cut too, so the
client sees a truncated body rather than a complete-looking one.

The app is plain ASGI (no framework per request: each layer costs microseconds on every
proxied call); `_proxy_cli` serves it with uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from ._proxy_routes import (
    API_ROOT,
    Upstream,
    UpstreamMap,
    error_body,
    forwarded_request_headers,
    forwarded_response_headers,
    is_traffic,
)

__all__ = ["ProxyApp", "ProxyCounters"]

logger = logging.getLogger("vllm_middleware.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_METRICS_PATH = "/metrics"


class ProxyCounters:
    """What the proxy did, read by the metrics exporter at scrape time (plain ints: nothing
    on the request path but an increment)."""

    __slots__ = (
        "client_disconnects",
        "in_flight",
        "requests",
        "unknown_model",
        "upstream_cut",
        "upstream_timeouts",
        "upstream_unreachable",
    )

    def __init__(self) -> None:
        self.requests = 0  # requests forwarded (or answered with an error by the proxy)
        self.in_flight = 0
        self.client_disconnects = 0  # clients gone before their response was complete
        self.upstream_unreachable = 0  # 502: no response from the upstream
        self.upstream_timeouts = 0  # 504
        self.upstream_cut = 0  # the upstream's body ended in an error mid-way
        self.unknown_model = 0  # 404: no upstream serves the model and there is no default


class _Guard:
    """Cancels a request's task when its client disconnects before the response is done."""

    __slots__ = ("disconnected", "finished", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.finished = False
        self.disconnected = False

    async def watch(self, receive: Receive) -> None:
        # After the body, the only message left is `http.disconnect`: the client going away,
        # or the server saying the response is complete (then `finished` is already set).
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not self.finished:
            self.disconnected = True
            self.task.cancel()


class ProxyApp:
    """ASGI app: `/metrics` is the proxy's own, every other path goes to an upstream."""

    def __init__(
        self,
        upstreams: UpstreamMap,
        recorded: httpx.AsyncBaseTransport,
        plain: httpx.AsyncBaseTransport,
        *,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_body_bytes: int = 64 * 1024 * 1024,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.recorded = recorded
        self.plain = plain
        self.counters = ProxyCounters()
        self.max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._on_shutdown = on_shutdown
        self._extensions = {
            "timeout": {
                "connect": connect_timeout,
                "read": timeout,
                "write": timeout,
                "pool": connect_timeout,
            }
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] == _METRICS_PATH and self._metrics is not None:
                await self._send_metrics(send)
            else:
                await self._forward(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # -- lifespan ---------------------------------------------------------------------------
    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The server has drained the requests in flight: the transports and the
                # recorder (its records flushed) can go.
                try:
                    await self.aclose()
                except Exception as exc:
                    logger.exception("proxy shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        try:
            await self.recorded.aclose()
            await self.plain.aclose()
        finally:
            if self._on_shutdown is not None:
                await self._on_shutdown()

    # -- forwarding -------------------------------------------------------------------------
    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        counters = self.counters
        counters.requests += 1
        body = await self._read_body(receive, send)
        if body is None:
            return
        method: str = scope["method"]
        path: str = scope["path"]
        if method == "GET" and path == f"{API_ROOT}/models" and len(self.upstreams.distinct()) > 1:
            await self._send_models(scope, send)
            return
        upstream, model = self.upstreams.pick(body)
        if upstream is None:
            counters.unknown_model += 1
            message = f"The model `{model}` does not exist." if model else "No model named."
            error = error_body(404, message, "NotFoundError", "model")
            await _send_whole(send, 404, error)
            return
        request = httpx.Request(
            method,
            upstream.target(path, scope["query_string"]),
            headers=forwarded_request_headers(scope["headers"]),
            # No body, no Content-Length: a GET goes out as the client sent it.
            content=body if body or method not in ("GET", "HEAD") else None,
            extensions=self._extensions,
        )
        transport = self.recorded if is_traffic(method, path) else self.plain
        task = asyncio.current_task()
        assert task is not None  # an ASGI server runs each request in a task
        guard = _Guard(task)
        watcher = asyncio.create_task(guard.watch(receive))
        counters.in_flight += 1
        try:
            await self._exchange(transport, request, upstream, send, guard)
        except asyncio.CancelledError:
            if not guard.disconnected:
                raise
            task.uncancel()  # ours: the client left; the server's own cancel would stay
            counters.client_disconnects += 1
        finally:
            counters.in_flight -= 1
            if not watcher.done():
                watcher.cancel()

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The request body; None when the client left or the body is too large (answered)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # http.disconnect
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    error = error_body(
                        413,
                        f"request body over the proxy's limit of {self.max_body_bytes} bytes",
                        "BadRequestError",
                    )
                    await _send_whole(send, 413, error)
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def _exchange(
        self,
        transport: httpx.AsyncBaseTransport,
        request: httpx.Request,
        upstream: Upstream,
        send: Send,
        guard: _Guard,
    ) -> None:
        try:
            response = await transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            self.counters.upstream_timeouts += 1
            guard.finished = True
            message = f"upstream {upstream.url} timed out ({type(exc).__name__})"
            await _send_whole(send, 504, error_body(504, message, "GatewayTimeoutError"))
            return
        except httpx.HTTPError as exc:
            self.counters.upstream_unreachable += 1
            guard.finished = True
            message = f"upstream {upstream.url} unreachable ({type(exc).__name__}: {exc})"
            await _send_whole(send, 502, error_body(502, message, "BadGatewayError"))
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": forwarded_response_headers(response.headers.raw),
                }
            )
            stream: Any = response.stream
            try:
                async for chunk in stream:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                # The upstream died mid-body: leave the response incomplete, so the server
                # cuts the client's connection and the client sees a truncated body.
                self.counters.upstream_cut += 1
                guard.finished = True
                logger.warning("upstream %s cut the response: %r", upstream.url, exc)
                return
            guard.finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _send_models(self, scope: Scope, send: Send) -> None:
        """GET /v1/models with several upstreams: every upstream's list, merged."""
        headers = forwarded_request_headers(scope["headers"])
        upstreams = self.upstreams.distinct()
        replies = await asyncio.gather(
            *(self._models_of(upstream, headers) for upstream in upstreams)
        )
        data: list[Any] = []
        seen: set[Any] = set()
        failures: list[str] = []
        for upstream, reply in zip(upstreams, replies, strict=True):
            if isinstance(reply, str):
                failures.append(f"{upstream.url}: {reply}")
                continue
            for item in reply:
                key = item.get("id") if isinstance(item, dict) else None
                if key is None or key not in seen:
                    seen.add(key)
                    data.append(item)
        if failures and not data:
            message = "no upstream listed its models (" + "; ".join(failures) + ")"
            await _send_whole(send, 502, error_body(502, message, "BadGatewayError"))
            return
        await _send_whole(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def _models_of(self, upstream: Upstream, headers: list[tuple[bytes, bytes]]) -> Any:
        request = httpx.Request(
            "GET",
            upstream.target(f"{API_ROOT}/models", b""),
            headers=headers,
            extensions=self._extensions,
        )
        try:
            response = await self.plain.handle_async_request(request)
            try:
                raw = await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        try:
            listed = orjson.loads(raw).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            return "not a model list"
        return listed if isinstance(listed, list) else "not a model list"

    async def _send_metrics(self, send: Send) -> None:
        assert self._metrics is not None
        body, content_type = self._metrics()
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _send_whole(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON})
    await send({"type": "http.response.body", "body": body})
