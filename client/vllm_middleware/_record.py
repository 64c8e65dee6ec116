"""The record contract: what one logged request looks like, how it is named and encoded.

Records are built as plain dicts and encoded once with orjson on the request path; the encoded
bytes travel unchanged through the buffer, the Redis stream and the worker into the files.
`LogRecord` is the read side: a light attribute view over a parsed line.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeAlias

import orjson

__all__ = [
    "HEAD_FIELDS",
    "SCHEMA_VERSION",
    "TAIL_FIELDS",
    "LogRecord",
    "RecordEntry",
    "RecordIdentity",
    "default_host",
    "encode_record",
    "new_request_id",
    "record_identity",
    "shrink_record",
    "utc_now",
]

#: Version of the record layout; bump it when a field changes meaning.
SCHEMA_VERSION = 2  # 1 was the original single-process tool's layout

_ORJSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_SECOND = timedelta(seconds=1)


class RecordEntry(NamedTuple):
    """An encoded record with the partition keys beside it, so no later stage re-parses it."""

    date: str  # UTC date of the record, YYYY-MM-DD
    host: str  # unsanitized; sanitized where it becomes a path
    is_error: bool
    data: bytes  # one JSON object, no trailing newline


#: What `record_identity` returns: (request id, UTC date `YYYY-MM-DD`, timestamp value). A
#: plain tuple named for type checkers only: a NamedTuple would cost the request path a second
#: tuple and the slow unpacking path of a tuple subclass (~+180 ns a call, measured), for
#: fields that every caller unpacks at once.
RecordIdentity: TypeAlias = tuple[str, str, "datetime | str"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def default_host() -> str:
    return os.environ.get("VLLM_MW_HOST") or socket.gethostname() or "unknown"


class _IdSource:
    """Process-unique request ids: a random token per process plus a counter.

    The token is renewed in forked children so pre-fork and post-fork processes never collide;
    the token makes ids unique across hosts without coordination.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.token = os.urandom(5).hex()
        self.counter = itertools.count(1)
        # The UTC second the cached text belongs to, as [start, end): empty until first use.
        self._start = self._end = datetime.min.replace(tzinfo=UTC)
        self._prefix = ""
        self._date = ""

    def next_id(self, now: datetime) -> str:
        return self.identity(now)[0]

    def identity(self, now: datetime) -> RecordIdentity:
        """(request id, date, timestamp) for a record made at `now`; see `record_identity`."""
        if now.tzinfo is not UTC:  # another zone (or naive): nothing cached for this one
            stamp = now.isoformat()
            return f"req_{now:%Y%m%d_%H%M%S}_{self.token}_{next(self.counter)}", stamp[:10], stamp
        # Same tzinfo object on both sides: plain field comparisons, cheaper than reading the
        # second's fields or calling utcoffset().
        if not self._start <= now < self._end:
            start = now.replace(microsecond=0)
            self._start, self._end = start, start + _SECOND
            self._prefix = f"req_{now:%Y%m%d_%H%M%S}_{self.token}_"
            self._date = f"{now:%Y-%m-%d}"
        return self._prefix + str(next(self.counter)), self._date, now


_ids = _IdSource()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reset)


#: `record_identity(now)`: a record's request id, UTC date (`YYYY-MM-DD`, its partition) and
#: `timestamp` value. For a UTC `now` the timestamp is `now` itself: orjson writes it exactly as
#: `now.isoformat()` does, in native code, where formatting the text here costs a few
#: microseconds per request. Bound once (the fork hook resets the same object), so the request
#: path pays for one Python call, not two.
record_identity = _ids.identity


def new_request_id(now: datetime | None = None) -> str:
    """A `req_YYYYMMDD_HHMMSS_<token>_<n>` id, unique across hosts and processes."""
    return _ids.next_id(now or utc_now())


def _default(obj: Any) -> Any:
    # Callers may pass pydantic models, sets, bytes... as parameters or metadata: logging must
    # record something rather than fail.
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "replace")
    return repr(obj)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Encode a record dict as compact JSON bytes (never raises for odd values)."""
    try:
        # Plain JSON values are the common case and the fastest orjson call.
        return orjson.dumps(record)
    except TypeError:
        return orjson.dumps(record, default=_default, option=_ORJSON_OPTS)


class LogRecord(Mapping[str, Any]):
    """One logged request as read back from the files.

    Attribute access (`r.error`, `r.latency_ms`) as in the original tool, plus mapping access
    (`r["usage"]`, `dict(r)`). Fields a record lacks read as None, so old and new schema
    versions can be analysed with the same code.
    """

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._data.get(name)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"LogRecord(request_id={self._data.get('request_id')!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LogRecord):
            return self._data == other._data
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (the parsed line itself, not a copy)."""
        return self._data

    # Typed accessors for the contract's fields, for type checkers and editors.
    @property
    def timestamp(self) -> str | None:
        return self._data.get("timestamp")

    @property
    def request_id(self) -> str | None:
        return self._data.get("request_id")

    @property
    def model(self) -> str | None:
        return self._data.get("model")

    @property
    def messages(self) -> list[Any] | None:
        return self._data.get("messages")

    @property
    def prompt(self) -> Any:
        return self._data.get("prompt")

    @property
    def response(self) -> dict[str, Any] | None:
        return self._data.get("response")

    @property
    def parameters(self) -> dict[str, Any]:
        return self._data.get("parameters") or {}

    @property
    def latency_ms(self) -> float | None:
        return self._data.get("latency_ms")

    @property
    def error(self) -> str | None:
        return self._data.get("error")

    @property
    def metadata(self) -> dict[str, Any]:
        return self._data.get("metadata") or {}

    @property
    def host(self) -> str | None:
        return self._data.get("host")

    @property
    def status_code(self) -> int | None:
        return self._data.get("status_code")


# A record's fields in order; the payload ("messages", "prompt" or "input") goes between the two.
HEAD_FIELDS = ("timestamp", "request_id", "model")
TAIL_FIELDS = (
    "response",
    "parameters",
    "latency_ms",
    "error",
    "metadata",
    "schema_version",
    "host",
    "endpoint",
    "status_code",
    "usage",
    "stream",
    "ttft_ms",
)

# What a truncated record keeps: enough to count, attribute and debug the call.
_KEPT_FIELDS = (
    *HEAD_FIELDS,
    *(field for field in TAIL_FIELDS if field != "response"),
    "error_detail",
    "client_request_id",
    "chunks",
    "stream_end",
)
_SMALL_FIELDS = ("parameters", "metadata", "error_detail")  # kept only when small
_SMALL_BYTES = 16 * 1024


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
