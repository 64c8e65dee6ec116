"""vllm-middleware: durable capture of every request and response to vLLM.

from vllm_middleware import VLLMMiddleware, load_logs
"""

from ._capture_transport import AsyncCaptureTransport, CaptureTransport
from ._client import VLLMMiddleware
from ._client_metrics import ClientMetrics
from ._exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InternalServerError,
    InvalidRequestError,
    LogReadError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    VLLMMiddlewareError,
)
from ._instrument import instrument
from ._media import MediaPolicy
from ._reader import ReadStats, iter_log_files, iter_logs, load_logs
from ._record import SCHEMA_VERSION, LogRecord, new_request_id
from ._redact import redact_secrets
from ._stats import get_statistics
from ._streaming import AsyncStream, StreamEnd
from ._sync_client import SyncVLLMMiddleware
from ._sync_streaming import Stream

__version__ = "0.2.0"

__all__ = [
    "SCHEMA_VERSION",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncCaptureTransport",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "CaptureTransport",
    "ClientMetrics",
    "ConfigurationError",
    "InternalServerError",
    "InvalidRequestError",
    "LogReadError",
    "LogRecord",
    "MediaPolicy",
    "NotFoundError",
    "RateLimitError",
    "ReadStats",
    "ServiceUnavailableError",
    "Stream",
    "StreamEnd",
    "SyncVLLMMiddleware",
    "VLLMMiddleware",
    "VLLMMiddlewareError",
    "get_statistics",
    "instrument",
    "iter_log_files",
    "iter_logs",
    "load_logs",
    "new_request_id",
    "redact_secrets",
]
