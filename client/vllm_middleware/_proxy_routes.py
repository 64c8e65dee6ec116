"""Where the logging proxy sends a request, and what of it crosses the hop.

Pure functions and small immutable classes (no I/O): parsing `--upstream` values, choosing the
upstream for a request (by the `model` of its JSON body, or of its `multipart/form-data` form
for audio uploads, when several are configured), the
upstream URL of a request path, which headers are hop-by-hop, and OpenAI-style error bodies
for the answers the proxy gives itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import orjson

from ._exceptions import ConfigurationError
from ._wire_headers import CONTROL_HEADERS

__all__ = [
    "API_ROOT",
    "Upstream",
    "UpstreamMap",
    "error_body",
    "forwarded_request_headers",
    "forwarded_response_headers",
    "is_traffic",
    "parse_upstreams",
]

#: The proxy's API root: apps use `http://proxy:port/v1` as their base URL.
API_ROOT = "/v1"

# RFC 9110 §7.6.1: these describe one connection, not the message; never forwarded.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the proxy sets itself: the upstream's host and the body's length (written by
# the pool), and the encoding: bodies are asked for uncompressed so that they can be recorded
# and so that SSE is never compressed (a compressing server buffers events). `Expect` is
# answered by the server in front; the body goes upstream whole. The proxy's own control
# headers (a record's metadata and host) never leave it.
_REQUEST_DROPPED = (
    _HOP_BY_HOP
    | {b"host", b"content-length", b"accept-encoding", b"expect"}
    | {name.encode() for name in CONTROL_HEADERS}
)
_EVENT_STREAM = b"text/event-stream"
_NO_BUFFERING = (b"x-accel-buffering", b"no")

# Read-only routes that are not traffic to a model: forwarded, never recorded.
_NOT_TRAFFIC = frozenset({"/health", "/ping", "/version", "/load", f"{API_ROOT}/models"})


@dataclass(frozen=True)
class Upstream:
    """One upstream API root, e.g. `http://vllm:8000/v1`."""

    url: str  # as given, without a trailing slash
    origin: str  # scheme://host[:port]
    prefix: str  # the API root's path, e.g. "/v1" (may be empty)

    @classmethod
    def parse(cls, url: str) -> Upstream:
        text = url.strip().rstrip("/")
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"--upstream takes an http:// or https:// URL (the API root, e.g. "
                f"http://vllm:8000/v1), not {url!r}"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigurationError(
                f"--upstream {url!r}: give the API root only (no query, fragment or password; "
                "clients send their own Authorization header)"
            )
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ConfigurationError(f"--upstream {url!r}: {exc}") from None
        return cls(text, f"{parts.scheme}://{parts.netloc}", parts.path)

    def target(self, path: str, query: bytes) -> str:
        """The upstream URL for a request to the proxy's `path` (?`query`).

        Paths under the proxy's `/v1` go under the upstream's API root; any other path (vLLM's
        `/health`, `/tokenize`, ...) goes to the upstream's origin as it is.
        """
        under_root = path == API_ROOT or path.startswith("/v1/")
        url = self.origin + (self.prefix + path[3:] if under_root else path)
        if query:
            url = f"{url}?{query.decode('latin-1')}"
        return url

    @cached_property
    def _raw_prefix(self) -> bytes:
        return self.prefix.encode()

    def raw_target(self, raw_path: bytes, query: bytes) -> bytes:
        """`target`'s path and query as the request line carries them (the client's bytes,
        percent-escapes and all)."""
        if raw_path == b"/v1" or raw_path.startswith(b"/v1/"):
            raw_path = self._raw_prefix + raw_path[3:] or b"/"
        return raw_path + b"?" + query if query else raw_path


@dataclass(frozen=True)
class UpstreamMap:
    """The default upstream (if any) and the upstreams of named models."""

    default: Upstream | None
    by_model: dict[str, Upstream]

    @property
    def routes_by_model(self) -> bool:
        return bool(self.by_model)

    def distinct(self) -> list[Upstream]:
        """Every configured upstream once (the default first)."""
        seen: dict[str, Upstream] = {}
        for upstream in (self.default, *self.by_model.values()):
            if upstream is not None:
                seen.setdefault(upstream.url, upstream)
        return list(seen.values())

    def pick(self, body: bytes, content_type: bytes = b"") -> tuple[Upstream | None, str | None]:
        """(the upstream for a request with this body, the model it names).

        The upstream is None when the body names a model no upstream serves and there is no
        default. A body that names no model (not a JSON object, a form without the field) goes
        to the default.
        """
        model = model_of(body, content_type) if self.by_model else None
        if model is not None:
            upstream = self.by_model.get(model)
            if upstream is not None:
                return upstream, model
        return self.default, model


def model_of(body: bytes, content_type: bytes = b"") -> str | None:
    """The `model` field of a JSON object body or of a `multipart/form-data` form, or None."""
    if content_type[:19].lower() == b"multipart/form-data":
        return _form_model(body, content_type)
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    return model if isinstance(model, str) else None


_FORM_BOUNDARY = re.compile(rb';\s*boundary="?([^";]+)"?', re.IGNORECASE)
_FORM_MODEL = re.compile(
    rb'content-disposition:\s*form-data;[^\r\n]*\bname="?model"?(?:[;\s]|\r\n)', re.I
)
_MAX_MODEL_NAME = 1024


def _form_model(body: bytes, content_type: bytes) -> str | None:
    """The value of a form's `model` field (RFC 7578). Only the part headers are searched:
    the field's name is matched where a part's Content-Disposition says it, so bytes of an
    uploaded file that happen to look alike are never taken for it."""
    found = _FORM_BOUNDARY.search(content_type)
    if found is None:
        return None
    boundary = b"--" + found.group(1)
    delimiter = b"\r\n" + boundary
    # A part's headers follow a delimiter line; the body's first delimiter has no CRLF before.
    if body.startswith(boundary):
        head_start = len(boundary)
    else:
        start = body.find(delimiter)
        if start < 0:
            return None
        head_start = start + len(delimiter)
    while True:
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            return None
        end = body.find(delimiter, head_end)
        if end < 0:
            return None
        if _FORM_MODEL.search(body, head_start, head_end + 2) is not None:
            value = body[head_end + 4 : end]
            if len(value) > _MAX_MODEL_NAME:
                return None
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
        head_start = end + len(delimiter)


def parse_upstreams(values: Sequence[str]) -> UpstreamMap:
    """`--upstream URL` (the default, once) and `--upstream MODEL=URL` (repeatable)."""
    default: Upstream | None = None
    by_model: dict[str, Upstream] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if sep and "://" not in name:
            name = name.strip()
            if not name:
                raise ConfigurationError(f"--upstream {value!r}: the model name is empty")
            if name in by_model:
                raise ConfigurationError(f"--upstream: model {name!r} given twice")
            by_model[name] = Upstream.parse(url)
        else:
            if default is not None:
                raise ConfigurationError(
                    f"--upstream: two default upstreams ({default.url} and {value}); "
                    "name the model of the others: --upstream MODEL=URL"
                )
            default = Upstream.parse(value)
    if default is None and not by_model:
        raise ConfigurationError("--upstream is required (the API root, e.g. http://vllm:8000/v1)")
    return UpstreamMap(default, by_model)


def is_traffic(method: str, path: str) -> bool:
    """Whether a request is traffic to record (listing models and health checks are not)."""
    if method not in ("GET", "HEAD"):
        return True
    return path not in _NOT_TRAFFIC and not path.startswith(f"{API_ROOT}/models/")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens)


def forwarded_request_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers to send upstream (ASGI gives names in lower case)."""
    dropped = _REQUEST_DROPPED
    out = []
    connection = False
    for header in headers:
        name = header[0]
        if name not in dropped:
            out.append(header)
        elif name == b"connection":
            connection = True
    if connection:
        extra = _connection_tokens(headers)
        if extra:
            out = [(name, value) for name, value in out if name not in extra]
    return out


def forwarded_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers to send to the client, names lower-cased; SSE gets
    `X-Accel-Buffering: no` so that a buffering proxy in front (nginx) passes events on."""
    out: list[tuple[bytes, bytes]] = []
    extra: frozenset[bytes] = frozenset()
    event_stream = buffering_said = False
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in _HOP_BY_HOP:
            if name == b"connection":
                extra = _connection_tokens([(name, value)])
            continue
        if name == b"content-type" and value.lower().startswith(_EVENT_STREAM):
            event_stream = True
        elif name == b"x-accel-buffering":
            buffering_said = True
        out.append((name, value))
    if extra:
        out = [(name, value) for name, value in out if name not in extra]
    if event_stream and not buffering_said:
        out.append(_NO_BUFFERING)
    return out


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> bytes:
    """An OpenAI-style error body (the shape vLLM and the openai SDK use)."""
    payload: dict[str, Any] = {
        "error": {"message": message, "type": error_type, "param": param, "code": status}
    }
    return orjson.dumps(payload)
