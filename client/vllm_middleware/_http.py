"""Turning server failures into the package's exceptions, whichever error shape vLLM used."""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping
from typing import Any, NamedTuple

import httpx
import orjson

from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    InvalidRequestError,
    status_error_class,
)

__all__ = [
    "ErrorEnvelope",
    "absolute_url",
    "control_reply",
    "error_details",
    "exception_from_response",
    "exception_from_transport",
    "exception_from_unsendable",
    "new_http_client",
    "new_sync_http_client",
    "parse_error_body",
]

_MAX_ERROR_TEXT = 2000


class ErrorEnvelope(NamedTuple):
    """What an error reply says, whichever shape it came in."""

    message: str
    type: str | None
    param: str | None
    body: Any  # the parsed JSON, or the text when it is not JSON


def parse_error_body(status_code: int, content: bytes) -> ErrorEnvelope:
    """The message, type, param and parsed body of any vLLM error envelope.

    Shapes: nested `{"error": {"message", "type", "param", "code"}}` (vLLM >= 0.10.1), flat
    `{"object": "error", "message", ...}` (older), `{"error": "Unauthorized"}` (API-key auth),
    and anything else (a proxy's HTML page, an empty body).
    """
    try:
        body: Any = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        text = content[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        return ErrorEnvelope(text or httpx.codes.get_reason_phrase(status_code), None, None, text)
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            return ErrorEnvelope(
                str(inner.get("message") or ""),
                _opt_str(inner.get("type")),
                _opt_str(inner.get("param")),
                body,
            )
        if isinstance(inner, str):
            return ErrorEnvelope(inner, None, None, body)
        if "message" in body:
            message = str(body["message"])
            return ErrorEnvelope(
                message, _opt_str(body.get("type")), _opt_str(body.get("param")), body
            )
    return ErrorEnvelope(httpx.codes.get_reason_phrase(status_code), None, None, body)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _url_of(exc_or_response: httpx.HTTPError | httpx.Response) -> httpx.URL | None:
    try:
        return exc_or_response.request.url
    except (AttributeError, RuntimeError):  # an error raised before any request was built
        return None


def _shown(url: httpx.URL) -> str:
    return str(url.copy_with(password="***")) if url.password else str(url)


def exception_from_response(response: httpx.Response, request_id: str) -> APIStatusError:
    message, error_type, param, body = parse_error_body(response.status_code, response.content)
    url = _url_of(response)
    if response.status_code == 404 and url is not None and "/v1/" not in url.path:
        # The commonest set-up mistake: vLLM serves the OpenAI API under /v1.
        message += f" ({_shown(url)}: is /v1 missing from base_url?)"
    cls = status_error_class(response.status_code)
    return cls(
        message,
        status_code=response.status_code,
        error_type=error_type,
        param=param,
        body=body,
        request_id=request_id,
    )


def exception_from_transport(exc: httpx.HTTPError, request_id: str) -> APIError:
    detail = str(exc) or type(exc).__name__
    url = _url_of(exc)
    if url is not None:
        detail = f"{_shown(url)}: {detail}"
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {detail}", request_id=request_id)
    return APIConnectionError(f"connection failed: {detail}", request_id=request_id)


def exception_from_unsendable(
    exc: Exception, url: object, request_id: str | None
) -> APIConnectionError | InvalidRequestError:
    """What the HTTP layer raised outside its own tree (`httpx.InvalidURL`, or a bare
    `ValueError`/`TypeError` for a URL or header it cannot send): nothing left the process."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.InvalidURL) or "url" in detail.lower():
        return APIConnectionError(f"cannot send to {url}: {detail}", request_id=request_id)
    return InvalidRequestError(f"request to {url} cannot be sent: {detail}")


def control_reply(response: httpx.Response, label: str) -> Any:
    """The JSON answer of a control-plane call (`models`: no record), or its error raised."""
    if response.status_code >= 400:
        raise exception_from_response(response, label)
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise APIError(f"server returned invalid JSON: {exc}") from exc


def error_details(exc: APIError | InvalidRequestError) -> dict[str, Any]:
    """The record's `error_detail`: what an analyst filters on."""
    message = exc.message if isinstance(exc, APIError) else str(exc)
    detail: dict[str, Any] = {"kind": type(exc).__name__, "message": message}
    if isinstance(exc, APIStatusError):
        detail.update(status_code=exc.status_code, type=exc.error_type, param=exc.param)
    return detail


@functools.lru_cache(maxsize=4)
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """httpx's default TLS context, made once per process (by the CA settings it reads from
    the environment): loading the CA bundle is most of the cost of a new HTTP client (tens of
    ms, far more on a loaded machine), and a client per request is a common pattern."""
    return httpx.create_ssl_context()


def absolute_url(base_url: str, endpoint: str) -> httpx.URL | str:
    try:
        return httpx.URL(f"{base_url}/{endpoint}")
    except (httpx.InvalidURL, ValueError, TypeError):
        return f"{base_url}/{endpoint}"  # raised, mapped and recorded by the first call


def _client_options(
    base_url: str, api_key: str | None, timeout: float | httpx.Timeout, headers: Mapping[str, str]
) -> dict[str, Any]:
    defaults = dict(headers)
    if api_key:
        defaults["authorization"] = f"Bearer {api_key}"
    return {
        "base_url": base_url,
        "timeout": timeout,
        "headers": defaults,
        "limits": httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        "verify": _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")),
    }


def new_http_client(
    base_url: str, api_key: str | None, timeout: float | httpx.Timeout, headers: Mapping[str, str]
) -> httpx.AsyncClient:
    """The HTTP client a middleware makes for itself when none is injected."""
    return httpx.AsyncClient(**_client_options(base_url, api_key, timeout, headers))


def new_sync_http_client(
    base_url: str, api_key: str | None, timeout: float | httpx.Timeout, headers: Mapping[str, str]
) -> httpx.Client:
    """`new_http_client` for `SyncVLLMMiddleware`: the same settings, blocking I/O."""
    return httpx.Client(**_client_options(base_url, api_key, timeout, headers))
