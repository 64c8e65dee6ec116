"""A real HTTP server that answers like vLLM's OpenAI server, for tests.

It runs stdlib ``ThreadingHTTPServer`` in a background thread: one thread per connection, HTTP/1.1
keep-alive, ``Content-Length`` bodies and chunked SSE streams. Responses are deterministic
functions of the request (see ``_fake_text``); fault-injection words in the last user message
(``[[status:503]]``, ``[[midstream_error]]``, ``[[drop]]``, ``[[slow:0.5]]``, ``[[hang]]``)
let tests provoke every failure mode a client must survive.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from ._fake_checks import Settings, parse_json_body
from ._fake_endpoints import ROUTES as ENDPOINT_ROUTES
from ._fake_endpoints import EndpointHandler
from ._fake_plan import (
    Drop,
    Prepared,
    Send,
    Sleep,
    prepare_chat,
    prepare_completion,
)
from ._fake_text import Chunker
from ._fake_wire import (
    VERSIONS,
    ErrorShape,
    FakeHTTPError,
    Flavor,
    dumps,
    error_body,
    midstream_error_event,
    models_body,
    triggered_error,
    unauthorized_body,
)

_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_GET_ROUTES = ("/health", "/version", "/v1/models")
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received, as it arrived."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None when the body was empty or not JSON
    raw_body: bytes
    received_at: float


class FakeVLLMServer:
    """Fake vLLM OpenAI server on a real socket; ``base_url`` ends in ``/v1``.

    Settings are plain attributes read at the start of every request, so a test may change
    e.g. ``token_delay`` or ``api_key`` while the server runs.
    """

    def __init__(
        self,
        flavor: Flavor = "v0.33",
        model: str = "vllm:qwen-2.5-omni-7b",
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        error_shape: ErrorShape | None = None,
        max_model_len: int = 32768,
        keepalive_interval: float | None = None,
        reasoning: bool = False,
        chunker: Chunker | None = None,
        first_token_delay: float = 0.0,
        token_delay: float = 0.0,
        merge_tool_name_delta: bool = False,
        prompt_tokens_details: bool = False,
    ) -> None:
        if flavor not in VERSIONS:
            raise ValueError(f"flavor must be one of {sorted(VERSIONS)}, not {flavor!r}")
        if error_shape not in (None, "nested", "flat"):
            raise ValueError(f"error_shape must be 'nested' or 'flat', not {error_shape!r}")
        self.flavor: Flavor = flavor
        self.model = model
        self.host = host
        self.port = port
        self.api_key = api_key
        self.error_shape: ErrorShape = error_shape or "nested"
        self.max_model_len = max_model_len
        self.keepalive_interval = keepalive_interval
        self.reasoning = reasoning
        self.chunker = chunker
        self.first_token_delay = first_token_delay
        self.token_delay = token_delay
        self.merge_tool_name_delta = merge_tool_name_delta
        # --enable-prompt-tokens-details: usage.prompt_tokens_details is filled in.
        self.prompt_tokens_details = prompt_tokens_details
        self._lock = threading.Condition()
        self._endpoints = EndpointHandler()
        self._requests: list[RecordedRequest] = []
        self._connections: set[socket.socket] = set()
        self._aborted_streams = 0
        self._peak_connections = 0
        self._stop_event = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle --------------------------------------------------------------------------------

    def start(self) -> FakeVLLMServer:
        """Bind and serve in a daemon thread. After ``stop()`` it may be started again."""
        if self._httpd is not None:
            return self
        self._stop_event = threading.Event()
        httpd = _HTTPServer((self.host, self.port), self)
        # Keep the port for restarts, so clients configured with base_url reconnect.
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-vllm-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection (hung ones included), wait for handlers."""
        httpd = self._httpd
        if httpd is None:
            return
        with self._lock:
            self._stop_event.set()
            connections = list(self._connections)
        httpd.shutdown()
        httpd.server_close()
        for connection in connections:
            # shutdown() rather than close(): it wakes a handler blocked in recv/send without
            # freeing the descriptor under its feet.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._lock.wait_for(lambda: not self._connections, timeout=_STOP_TIMEOUT)
        if self._thread is not None:
            self._thread.join(timeout=_STOP_TIMEOUT)
        self._httpd = None
        self._thread = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> FakeVLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Introspection ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Root URL without ``/v1`` (for ``/health`` and ``/version``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far (all paths), oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def aborted_streams(self) -> int:
        """Streams the client abandoned before the server finished writing them."""
        with self._lock:
            return self._aborted_streams

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def peak_connections(self) -> int:
        """The most connections that were open at the same time."""
        with self._lock:
            return self._peak_connections

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # Used by the handler --------------------------------------------------------------------

    def _settings(self) -> Settings:
        return Settings(
            self.flavor,
            self.model,
            self.error_shape,
            self.max_model_len,
            self.reasoning,
            self.chunker,
            self.first_token_delay,
            self.token_delay,
            self.merge_tool_name_delta,
            self.prompt_tokens_details,
        )

    def _register(self, connection: socket.socket) -> threading.Event | None:
        with self._lock:
            if self._stop_event.is_set():
                return None
            self._connections.add(connection)
            self._peak_connections = max(self._peak_connections, len(self._connections))
            return self._stop_event

    def _unregister(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._lock.notify_all()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _count_abort(self) -> None:
        with self._lock:
            self._aborted_streams += 1


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the default of 5 drops connections under a burst of clients

    def __init__(self, address: tuple[str, int], fake: FakeVLLMServer) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall on bad DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # clients vanishing and stop() cutting sockets are expected here
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    sys_version = ""
    disable_nagle_algorithm = True  # small SSE chunks must not wait for delayed ACKs
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.fake = self.server.fake
        stop_event = self.fake._register(self.connection)
        self.stop_event = stop_event or threading.Event()
        if stop_event is None:
            self.close_connection = True
            self._cut()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.fake._unregister(self.connection)

    def log_message(self, *args: Any) -> None:
        return  # request lines on stderr would drown test output

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # Plumbing -------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, dumps(payload), "application/json")

    def _cut(self) -> None:
        """Close the connection without a (complete) response."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _wait(self, seconds: float) -> bool:
        """Sleep unless the server stops first; False means stopping."""
        return seconds <= 0 or not self.stop_event.wait(seconds)

    def _stream_sleep(self, seconds: float, keepalive: float | None) -> bool:
        if seconds <= 0:
            return True
        if not keepalive or keepalive <= 0:
            return self._wait(seconds)
        # At least one comment per pause, then one per interval, like an idle vLLM stream.
        steps = max(1, math.ceil(seconds / keepalive))
        for _ in range(steps):
            if not self._wait(seconds / steps):
                return False
            self._write_chunk(b": keep-alive\n\n")
        return True

    # Routing --------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        try:
            raw = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        self.fake._record(RecordedRequest(self.command, path, headers, parsed, raw, time.time()))
        try:
            self._route(path, headers, raw)
        except OSError:
            self.close_connection = True

    def _route(self, path: str, headers: Mapping[str, str], raw: bytes) -> None:
        fake = self.fake
        api_key = fake.api_key
        guarded = api_key is not None and path.startswith("/v1")
        if guarded and headers.get("authorization") != f"Bearer {api_key}":
            self._json(401, unauthorized_body())
            return
        if path in _GET_ROUTES:
            if self.command != "GET":
                self._json(405, {"detail": "Method Not Allowed"})
            elif path == "/health":
                self._send(200, b"", None)
            elif path == "/version":
                self._json(200, {"version": VERSIONS[fake.flavor]})
            else:
                self._json(200, models_body(fake.flavor, fake.model, fake.max_model_len))
            return
        if path not in (_CHAT, _COMPLETIONS) and path not in ENDPOINT_ROUTES:
            self._json(404, {"detail": "Not Found"})
            return
        if self.command != "POST":
            self._json(405, {"detail": "Method Not Allowed"})
            return
        settings = fake._settings()
        try:
            if path in ENDPOINT_ROUTES:
                prepared = fake._endpoints.handle(settings, path, headers, raw)
            else:
                body = parse_json_body(settings, headers, raw)
                prepare = prepare_chat if path == _CHAT else prepare_completion
                prepared = prepare(settings, body, headers)
        except FakeHTTPError as error:
            self._json(error.status, error.payload)
            return
        except Exception as exc:
            # A bug in the fake or in a test's chunker: answer 500 and keep the traceback
            # visible instead of silently dropping the connection.
            traceback.print_exc()
            self._json(500, error_body(settings.error_shape, repr(exc), "InternalServerError", 500))
            return
        self._respond(settings, prepared)

    def _respond(self, settings: Settings, prepared: Prepared) -> None:
        triggers = prepared.triggers
        if triggers.hang:
            self.stop_event.wait()
            self._cut()
            return
        if triggers.status is not None:
            error = triggered_error(settings.error_shape, triggers.status)
            self._json(error.status, error.payload)
            return
        if not prepared.stream:
            if triggers.drop or not self._wait(prepared.delay):
                self._cut()
            elif triggers.midstream_error:
                # Without a stream to carry it, the engine failure becomes the HTTP error.
                payload = json.loads(midstream_error_event(settings.flavor, settings.error_shape))
                inner = payload["error"]
                body = inner if settings.error_shape == "flat" else payload
                self._json(int(inner["code"]), body)
            else:
                self._json(200, prepared.body)
            return
        self._stream(prepared)

    def _stream(self, prepared: Prepared) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        keepalive = self.fake.keepalive_interval
        try:
            for event in prepared.events:
                if isinstance(event, Sleep):
                    if not self._stream_sleep(event.seconds, keepalive):
                        self._cut()
                        return
                elif isinstance(event, Send):
                    self._write_chunk(event.payload)
                elif isinstance(event, Drop):
                    self._cut()
                    return
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            if not self.stop_event.is_set():
                self.fake._count_abort()
            self._cut()
