"""One call's record: what the request path knows, built into a record dict exactly once."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._exceptions import APIError, InvalidRequestError
from ._http import error_details
from ._record import SCHEMA_VERSION, encode_record, request_id_and_timestamp

if TYPE_CHECKING:
    from ._client import VLLMMiddleware

__all__ = ["Call", "collect", "header_request_id", "shrink_record"]

# What a truncated record keeps: enough to count, attribute and debug the call.
_KEPT_FIELDS = (
    "timestamp",
    "request_id",
    "model",
    "parameters",
    "latency_ms",
    "error",
    "error_detail",
    "metadata",
    "schema_version",
    "host",
    "endpoint",
    "status_code",
    "usage",
    "stream",
    "ttft_ms",
    "client_request_id",
    "chunks",
    "stream_end",
)
_SMALL_FIELDS = ("parameters", "metadata", "error_detail")  # kept only when small
_SMALL_BYTES = 16 * 1024


def collect(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def header_request_id(headers: Mapping[str, str]) -> str | None:
    for name, value in headers.items():
        if name.lower() == "x-request-id":
            return value
    return None


class Call:
    """What one call knows for its record; `log` builds and submits it exactly once."""

    __slots__ = (
        "client",
        "client_request_id",
        "endpoint",
        "metadata",
        "model",
        "now",
        "params",
        "payload",
        "payload_key",
        "request_id",
        "timestamp",
    )

    def __init__(
        self,
        client: VLLMMiddleware,
        endpoint: str,
        payload_key: str,
        payload: Any,
        model: str | None,
        params: dict[str, Any],
        metadata: Mapping[str, Any] | None,
        now: datetime,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.payload_key = payload_key
        self.payload = payload
        self.model = model
        self.params = params
        self.metadata = metadata
        self.now = now
        self.request_id, self.timestamp = request_id_and_timestamp(now)
        self.client_request_id: Any = None

    def log(
        self,
        started: float,
        *,
        response: Any = None,
        error: APIError | InvalidRequestError | None = None,
        status_code: int | None = None,
        stream: bool = False,
        ttft_ms: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        # Microseconds, as milliseconds with 3 decimals (round(x, 3) costs ~0.5 µs more).
        latency_ms = int((time.perf_counter() - started) * 1_000_000 + 0.5) / 1000
        client = self.client
        model = self.model
        if model is None and isinstance(response, dict):
            model = response.get("model")
        metadata = client.metadata
        if self.metadata:
            metadata = {**metadata, **self.metadata}
        timestamp = self.timestamp
        record: dict[str, Any] = {
            "timestamp": timestamp,
            "request_id": self.request_id,
            "model": model,
            self.payload_key: self.payload,
            "response": response,
            "parameters": self.params,
            "latency_ms": latency_ms,
            "error": None if error is None else str(error),
            "metadata": metadata,
            "schema_version": SCHEMA_VERSION,
            "host": client.host,
            "endpoint": self.endpoint,
            "status_code": status_code,
            "usage": response.get("usage") if isinstance(response, dict) else None,
            "stream": stream,
            "ttft_ms": ttft_ms,
        }
        if self.client_request_id is not None:
            record["client_request_id"] = self.client_request_id
        if error is not None:
            record["error_detail"] = error_details(error)
        if extra:
            record.update(extra)
        client._submit(record, timestamp[:10], error is not None)


def shrink_record(record: Mapping[str, Any], original_bytes: int, max_bytes: int) -> bytes:
    """The encoded stand-in for a record of `original_bytes` over the `max_bytes` cap.

    Keeps the metadata (`parameters`, `metadata` and `error_detail` only when small) and says
    why in `truncated`, so the call is still counted and attributable.
    """
    small: dict[str, Any] = {key: record[key] for key in _KEPT_FIELDS if key in record}
    for key in _SMALL_FIELDS:
        if key in small and len(encode_record(small[key])) > _SMALL_BYTES:
            small[key] = {"truncated": True}
    if isinstance(small.get("error"), str) and len(small["error"]) > _SMALL_BYTES:
        small["error"] = small["error"][:_SMALL_BYTES]
    small["truncated"] = {
        "original_bytes": original_bytes,
        "reason": f"record exceeds max_record_bytes ({original_bytes} > {max_bytes})",
    }
    return encode_record(small)
