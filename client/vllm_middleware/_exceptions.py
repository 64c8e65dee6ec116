"""One rooted exception tree: everything the package raises derives from `VLLMMiddlewareError`."""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ExportError",
    "InternalServerError",
    "InvalidRequestError",
    "LogReadError",
    "NotFoundError",
    "QueryError",
    "RateLimitError",
    "ServiceUnavailableError",
    "VLLMMiddlewareError",
]


class VLLMMiddlewareError(Exception):
    """Root of every exception raised by vllm-middleware."""


class ConfigurationError(VLLMMiddlewareError, ValueError):
    """A setting or argument is invalid; raised at construction, never on the request path."""


class LogReadError(VLLMMiddlewareError):
    """The log tree could not be read (missing directory, unreadable file)."""


class ExportError(VLLMMiddlewareError):
    """An export could not be delivered (an OTLP endpoint refused or could not be reached)."""


class QueryError(VLLMMiddlewareError):
    """A query over the log tree failed (bad SQL, unreadable data); the message is one line."""


class APIError(VLLMMiddlewareError):
    """A call to the model server failed. The failure is logged as a record before it is raised."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the middleware's record id, to find the logged record of this failure
        self.request_id = request_id


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke before a response."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the configured timeout."""


class APIStatusError(APIError):
    """The server answered with an HTTP error status (4xx/5xx).

    Carries the fields of vLLM's error envelope, whichever shape the server used: nested
    `{"error": {...}}` (vLLM >= 0.10.1), flat `{"object": "error", ...}` (older), or the bare
    `{"error": "Unauthorized"}` of API-key failures. Errors that arrive inside a stream (HTTP
    200, then `data: {"error": ...}`) are raised as the class of their `code`, with `in_stream`.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_type: str | None = None,
        param: str | None = None,
        body: Any = None,
        request_id: str | None = None,
        in_stream: bool = False,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.status_code = status_code
        self.error_type = error_type
        self.param = param
        self.body = body
        #: True for an error event inside a stream: the HTTP status was 200 and `status_code`
        #: is the `code` of the event
        self.in_stream = in_stream

    def __str__(self) -> str:
        kind = f" {self.error_type}" if self.error_type else ""
        return f"HTTP {self.status_code}{kind}: {self.message}"


class BadRequestError(APIStatusError):
    """HTTP 400."""


class AuthenticationError(APIStatusError):
    """HTTP 401/403."""


class NotFoundError(APIStatusError):
    """HTTP 404, e.g. an unknown model."""


class RateLimitError(APIStatusError):
    """HTTP 429."""


class InternalServerError(APIStatusError):
    """HTTP 5xx other than 503."""


class ServiceUnavailableError(InternalServerError):
    """HTTP 503: vLLM's queue is full or the engine asks to retry."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if status_code >= 500:
        return InternalServerError
    return APIStatusError


class InvalidRequestError(VLLMMiddlewareError, ValueError):
    """The call's arguments cannot be sent (e.g. not JSON-serializable); nothing was sent."""
