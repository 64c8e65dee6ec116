"""Turning server failures into the package's exceptions, whichever error shape vLLM used."""

from __future__ import annotations

from typing import Any

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

__all__ = ["error_details", "exception_from_response", "exception_from_transport"]

_MAX_ERROR_TEXT = 2000


def parse_error_body(status_code: int, content: bytes) -> tuple[str, str | None, str | None, Any]:
    """(message, type, param, parsed body) from any vLLM error envelope.

    Shapes: nested `{"error": {"message", "type", "param", "code"}}` (vLLM >= 0.10.1), flat
    `{"object": "error", "message", ...}` (older), `{"error": "Unauthorized"}` (API-key auth),
    and anything else (a proxy's HTML page, an empty body).
    """
    try:
        body: Any = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        text = content[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        return text or httpx.codes.get_reason_phrase(status_code), None, None, text
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            return (
                str(inner.get("message") or ""),
                _opt_str(inner.get("type")),
                _opt_str(inner.get("param")),
                body,
            )
        if isinstance(inner, str):
            return inner, None, None, body
        if "message" in body:
            message = str(body["message"])
            return message, _opt_str(body.get("type")), _opt_str(body.get("param")), body
    return httpx.codes.get_reason_phrase(status_code), None, None, body


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


def error_details(exc: APIError | InvalidRequestError) -> dict[str, Any]:
    """The record's `error_detail`: what an analyst filters on."""
    message = exc.message if isinstance(exc, APIError) else str(exc)
    detail: dict[str, Any] = {"kind": type(exc).__name__, "message": message}
    if isinstance(exc, APIStatusError):
        detail.update(status_code=exc.status_code, type=exc.error_type, param=exc.param)
    return detail
