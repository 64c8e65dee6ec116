"""The logging proxy's ASGI app: every request passed to an upstream, recorded on the way.

The app moves bytes: the client's request (minus hop-by-hop headers) to the upstream through
the proxy's own HTTP/1.1 pool (`_proxy_pool`), and the upstream's status, headers and body
back, each body chunk sent on as soon as it arrives. Recording is beside that path, never in
front of it: the request is handed to the capture (`WireCapture`, the core the SDK doors use,
so every door writes the same records) once it has left for the upstream, and each part of the
response once it has been passed to the client. Listing models and health checks are not
recorded.

A client that goes away cancels the upstream request: a watcher waits for the ASGI
`http.disconnect` and cancels the request's task, which aborts the upstream connection and
records the call as cancelled. An upstream that cannot be reached gets a 502 (504 on a
timeout) in OpenAI's error format; one that dies mid-body has the client's connection cut too,
so the client sees a truncated body rather than a complete-looking one.

The app is plain ASGI (no framework per request: each layer costs microseconds on every
proxied call); `_proxy_cli` serves it with uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ._exceptions import APIError
from ._proxy_pool import UpstreamCall, UpstreamError, UpstreamPool
from ._proxy_routes import (
    API_ROOT,
    Upstream,
    UpstreamMap,
    error_body,
    forwarded_request_headers,
    forwarded_response_headers,
    is_traffic,
)
from ._wire_capture import Exchange, WireCapture, transport_error
from ._wire_headers import read_headers

__all__ = ["ProxyApp", "ProxyCounters"]

logger = logging.getLogger("vllm_middleware.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_METRICS_PATH = "/metrics"
_MODELS_PATH = f"{API_ROOT}/models"


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


class _Recording:
    """One proxied call's record, fed beside the forwarding: the request once it has left for
    the upstream, each part of the response once it has been passed to the client."""

    __slots__ = ("_body", "_capture", "_exchange", "_responded", "_scope", "_started")

    def __init__(self, capture: WireCapture, scope: Scope, body: bytes, started: float) -> None:
        self._capture = capture
        self._scope = scope
        self._body = body
        self._started = started
        self._exchange: Exchange | None = None
        self._responded = False

    def begin(self) -> Exchange | None:
        if self._exchange is None:
            scope = self._scope
            found = read_headers(scope["headers"])
            self._exchange = self._capture.begin(
                scope["method"], scope["path"], found, self._body, self._started
            )
        return self._exchange

    def failed(self, exc: UpstreamError, upstream: Upstream) -> None:
        exchange = self.begin()
        if exchange is not None:
            url = upstream.target(self._scope["path"], self._scope["query_string"])
            error = transport_error(exc, url, exchange.request_id, timeout=exc.timeout)
            exchange.fail(error)

    def cancelled(self) -> None:
        exchange = self.begin()
        if exchange is None:
            return
        if self._responded:
            message = "cancelled by the caller while the response was read"
            exchange.finish("cancelled", APIError(message, request_id=exchange.request_id))
        else:
            exchange.fail(APIError("cancelled by the caller before the response"), retried=False)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._responded = True
        exchange = self._exchange
        if exchange is not None:
            exchange.respond(status, read_headers(headers))

    def feed(self, chunk: bytes) -> None:
        if self._exchange is not None:
            self._exchange.feed(chunk)

    def cut(self, exc: UpstreamError) -> None:
        exchange = self._exchange
        if exchange is not None:
            rid = exchange.request_id
            error = transport_error(exc, "response body", rid, timeout=exc.timeout)
            exchange.finish("disconnected", error)

    def done(self) -> None:
        if self._exchange is not None:
            self._exchange.finish("done")


class ProxyApp:
    """ASGI app: `/metrics` is the proxy's own, every other path goes to an upstream."""

    def __init__(
        self,
        upstreams: UpstreamMap,
        pool: UpstreamPool,
        capture: WireCapture | None = None,
        *,
        max_body_bytes: int = 64 * 1024 * 1024,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.pool = pool
        self.capture = capture
        self.counters = ProxyCounters()
        self.max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._on_shutdown = on_shutdown
        self._merge_models = len(upstreams.distinct()) > 1

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
                # The server has drained the requests in flight: the connections and the
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
            await self.pool.aclose()
        finally:
            if self._on_shutdown is not None:
                await self._on_shutdown()

    # -- forwarding -------------------------------------------------------------------------
    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        counters = self.counters
        counters.requests += 1
        body = await self._read_body(receive, send)
        if body is None:
            return
        method: str = scope["method"]
        path: str = scope["path"]
        if method == "GET" and path == _MODELS_PATH and self._merge_models:
            await self._send_models(scope, send)
            return
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        content_type = b""
        if self.upstreams.routes_by_model:
            for name, value in raw_headers:
                if name == b"content-type":
                    content_type = value
        upstream, model = self.upstreams.pick(body, content_type)
        if upstream is None:
            counters.unknown_model += 1
            message = f"The model `{model}` does not exist." if model else "No model named."
            error = error_body(404, message, "NotFoundError", "model")
            await _send_whole(send, 404, error)
            return
        task = asyncio.current_task()
        assert task is not None  # an ASGI server runs each request in a task
        guard = _Guard(task)
        watcher = asyncio.create_task(guard.watch(receive))
        counters.in_flight += 1
        capture = self.capture
        exchange = None
        if capture is not None and is_traffic(method, path):
            exchange = _Recording(capture, scope, body, started)
        try:
            await self._exchange(scope, body, upstream, send, guard, exchange)
        except asyncio.CancelledError:
            if exchange is not None:
                exchange.cancelled()
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
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False) and len(body) <= self.max_body_bytes:
            return body  # the usual case: the whole body in one message
        chunks = [body]
        size = len(body)
        while size <= self.max_body_bytes and message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
        if size > self.max_body_bytes:
            error = error_body(
                413,
                f"request body over the proxy's limit of {self.max_body_bytes} bytes",
                "BadRequestError",
            )
            await _send_whole(send, 413, error)
            return None
        return b"".join(chunks)

    async def _exchange(
        self,
        scope: Scope,
        body: bytes,
        upstream: Upstream,
        send: Send,
        guard: _Guard,
        recording: _Recording | None,
    ) -> None:
        call: UpstreamCall | None = None
        try:
            try:
                call = await self.pool.send(
                    upstream.origin,
                    scope["method"],
                    upstream.raw_target(
                        scope.get("raw_path") or scope["path"].encode(), scope["query_string"]
                    ),
                    forwarded_request_headers(scope["headers"]),
                    body,
                )
                if recording is not None:
                    recording.begin()  # while the upstream works on the request
                status, raw_headers = await call.head()
            except UpstreamError as exc:
                guard.finished = True
                if recording is not None:
                    recording.failed(exc, upstream)
                await self._upstream_failed(exc, upstream, send)
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": forwarded_response_headers(raw_headers),
                }
            )
            if recording is not None:
                recording.respond(status, raw_headers)
            read = call.read
            while True:
                try:
                    chunk, last = await read()
                except UpstreamError as exc:
                    # The upstream died mid-body: leave the response incomplete, so the server
                    # cuts the client's connection and the client sees a truncated body.
                    self.counters.upstream_cut += 1
                    guard.finished = True
                    logger.warning("upstream %s cut the response: %s", upstream.url, exc)
                    if recording is not None:
                        recording.cut(exc)
                    return
                if last:
                    guard.finished = True
                    call.release()  # complete: the connection can serve the next request
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    if recording is not None:
                        recording.feed(chunk)
                        recording.done()
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if recording is not None:
                    recording.feed(chunk)
        finally:
            if call is not None:
                call.release()

    async def _upstream_failed(self, exc: UpstreamError, upstream: Upstream, send: Send) -> None:
        if exc.timeout:
            self.counters.upstream_timeouts += 1
            message = f"upstream {upstream.url} timed out ({exc})"
            await _send_whole(send, 504, error_body(504, message, "GatewayTimeoutError"))
        else:
            self.counters.upstream_unreachable += 1
            message = f"upstream {upstream.url} unreachable ({exc})"
            await _send_whole(send, 502, error_body(502, message, "BadGatewayError"))

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
        target = upstream.raw_target(_MODELS_PATH.encode(), b"")
        call: UpstreamCall | None = None
        parts: list[bytes] = []
        try:
            call = await self.pool.send(upstream.origin, "GET", target, headers, b"")
            status, _ = await call.head()
            last = False
            while not last:
                chunk, last = await call.read()
                parts.append(chunk)
        except UpstreamError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            if call is not None:
                call.release()
        if status != 200:
            return f"HTTP {status}"
        try:
            listed = orjson.loads(b"".join(parts)).get("data")
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
