"""`vllm-mw proxy`: serve the logging proxy (`_proxy.ProxyApp`) with uvicorn.

The listening socket is bound here, before the server starts, so that `--listen HOST:0` works
and the line on stderr names the real port. uvicorn drains the requests in flight on SIGTERM
or SIGINT (`--drain-timeout`), then the app's lifespan shutdown closes the upstream
connections and the recorder, which flushes its records.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from ._exceptions import ConfigurationError
from ._proxy_routes import UpstreamMap, parse_upstreams
from ._redis_url import argv_password_warning, mask_url
from ._wire_capture import WireCapture

if TYPE_CHECKING:  # the app and its pool need the [proxy] extra: imported when serving
    from ._proxy import ProxyApp

__all__ = ["add_arguments", "run"]

_DEFAULT_LISTEN = "127.0.0.1:8090"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="[MODEL=]URL",
        help="the API root to forward to, e.g. http://vllm:8000/v1; MODEL=URL (repeatable) "
        "sends requests for MODEL there (the model is read from the JSON body, or the form "
        "of a multipart upload)",
    )
    parser.add_argument(
        "--listen",
        default=_DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to serve on (default {_DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--redis-url", help="Redis mode (env VLLM_MW_REDIS_URL); else files under --log-dir"
    )
    parser.add_argument("--log-dir", help="embedded mode's log tree (default ./logs/vllm)")
    parser.add_argument("--stream", help="Redis stream key (default vllm:logs)")
    parser.add_argument(
        "--host", help="records' host (default: this machine; a request's X-VLLM-MW-Host wins)"
    )
    parser.add_argument(
        "--metadata", metavar="JSON", help="a JSON object added to every record's metadata"
    )
    parser.add_argument(
        "--content",
        choices=("full", "metadata"),
        help="`metadata`: records without message or response text",
    )
    parser.add_argument("--sample-rate", type=float, help="share of successful calls recorded")
    parser.add_argument("--no-record", action="store_true", help="forward only: write no records")
    parser.add_argument("--no-metrics", action="store_true", help="serve no /metrics")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds an upstream may take between two reads (default 600)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to connect (default 10)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="connections to the upstreams at most (default 1000)",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=64.0, help="largest request body (default 64 MB)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let requests in flight finish (default 30)",
    )
    parser.add_argument(
        "--http",
        choices=("auto", "h11", "httptools"),
        default="auto",
        help="uvicorn's HTTP parser (auto: httptools when installed, the [proxy] extra has it)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (auto: uvloop when installed, the [proxy] extra has it)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="traceback on failure")


def _listen_address(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"--listen takes HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off only on sockets that say they are TCP,
    # and with Nagle on, a response's body waits ~40 ms for the ACK of its headers.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def _metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigurationError(f"--metadata is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigurationError("--metadata must be a JSON object")
    return value


def _recording(
    args: argparse.Namespace,
) -> tuple[WireCapture | None, Callable[[], Awaitable[None]] | None, Any, str]:
    """(the capture that records traffic, what flushes the records, the recorder, a line
    saying where records go)."""
    if args.no_record:
        return None, None, None, "recording off"
    from ._recorder import Recorder

    options: dict[str, Any] = {
        "redis_url": args.redis_url,
        "log_dir": args.log_dir,
        "stream": args.stream,
        "host": args.host,
        "metadata": _metadata(args.metadata),
        "content": args.content,
        "sample_rate": args.sample_rate,
    }
    recorder = Recorder.open(**{key: value for key, value in options.items() if value is not None})
    if recorder.mode == "redis":
        where = "records to Redis"
    elif recorder.mode == "embedded":
        where = f"records under {args.log_dir or './logs/vllm'}"
    else:
        where = "recording off"
    return WireCapture(recorder), recorder.aclose, recorder, where


def build_app(args: argparse.Namespace, upstreams: UpstreamMap) -> tuple[ProxyApp, str]:
    """The app for `args`, and a line saying where its records go."""
    from ._proxy import ProxyApp
    from ._proxy_pool import UpstreamPool

    pool = UpstreamPool(
        max_connections=args.max_connections,
        keepalive_expiry=60.0,
        connect_timeout=args.connect_timeout,
        timeout=args.timeout,
    )
    capture, flush, recorder, where = _recording(args)
    metrics = None
    if not args.no_metrics:
        from ._proxy_metrics import ProxyMetrics

        metrics = ProxyMetrics()
        if recorder is not None:
            recorder.record_observer = metrics.observe
    app = ProxyApp(
        upstreams,
        pool,
        capture,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        metrics=None if metrics is None else metrics.render,
        on_shutdown=flush,
    )
    if metrics is not None:
        metrics.watch(app.counters)
    return app, where


def run(args: argparse.Namespace) -> int:
    try:
        import httptools  # noqa: F401 - the upstream client's parser
        import uvicorn
    except ImportError:
        raise ConfigurationError(
            "the proxy needs uvicorn: pip install 'vllm-middleware[proxy]'"
        ) from None
    warning = argv_password_warning(args.redis_url)
    if warning:
        print(f"vllm-mw: warning: {warning}", file=sys.stderr)
    for name in ("timeout", "connect_timeout", "max_body_mb", "drain_timeout"):
        if not getattr(args, name) > 0:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be > 0")
    if args.max_connections < 1:
        raise ConfigurationError("--max-connections must be >= 1")
    upstreams = parse_upstreams(args.upstream)
    host, port = _listen_address(args.listen)
    app, where = build_app(args, upstreams)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = ", ".join(
        [u.url for u in [upstreams.default] if u is not None]
        + [f"{model}={u.url}" for model, u in upstreams.by_model.items()]
    )
    print(
        f"vllm-mw proxy: listening on http://{host}:{bound}/v1 -> {mask_url(shown)} ({where})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        server_header=False,  # the upstream's own Server and Date headers pass through
        date_header=False,
        # X-Forwarded-For is the upstream's to read (it is forwarded): nothing here uses the
        # client's address, so uvicorn's middleware that rewrites it is a layer for nothing.
        proxy_headers=False,
        lifespan="on",
        timeout_graceful_shutdown=args.drain_timeout,
        timeout_keep_alive=75,
        http=args.http,
        loop=args.loop,
    )
    _quiet_cut_responses()
    server = uvicorn.Server(config)

    def terminate(signum: int, frame: Any) -> None:
        # uvicorn handles SIGTERM while it serves (drain, then shutdown) and raises it again
        # once done, to this handler: the drain went well, exit 0. Before it serves: stop.
        if not server.started:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0


class _CutResponses(logging.Filter):
    """uvicorn's line for a response left incomplete on purpose (the upstream cut it, and the
    proxy has already said so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


def _quiet_cut_responses() -> None:
    logging.getLogger("uvicorn.error").addFilter(_CutResponses())
    ours = logging.getLogger("vllm_middleware.proxy")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("vllm-mw proxy: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
