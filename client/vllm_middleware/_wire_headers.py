"""The request and response headers the capture reads, and how it reads them cheaply.

Headers are read only by name (`READ_HEADERS`): `Authorization` and API keys never reach a
record. The two `X-VLLM-MW-*` control headers are ours, not the server's: a door removes them
before the request leaves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

__all__ = [
    "CONTROL_HEADERS",
    "HOST_HEADER",
    "IDEMPOTENCY_HEADER",
    "METADATA_HEADER",
    "READ_HEADERS",
    "RETRY_COUNT_HEADER",
    "read_headers",
    "read_library_headers",
    "read_lowered",
]

METADATA_HEADER: Final = "x-vllm-mw-metadata"  # a JSON object: this call's metadata
HOST_HEADER: Final = "x-vllm-mw-host"  # the record's host (partition) for this call
# Ours, not the server's: a door removes them before the request leaves.
CONTROL_HEADERS: Final = (METADATA_HEADER, HOST_HEADER)
RETRY_COUNT_HEADER: Final = "x-stainless-retry-count"  # the openai SDK's attempt number (0 first)
IDEMPOTENCY_HEADER: Final = "idempotency-key"
#: The headers `WireCapture.begin` and `Exchange.respond` read (lower-case); nothing else of
#: a request is looked at.
READ_HEADERS: Final = frozenset(
    (
        *CONTROL_HEADERS,
        "x-request-id",
        "content-type",
        "content-encoding",
        RETRY_COUNT_HEADER,
        IDEMPOTENCY_HEADER,
    )
)
_READ_RAW = frozenset(name.encode() for name in READ_HEADERS)
# Most names are ruled out by their length alone, before a lower-cased copy is made.
_READ_LENGTHS = frozenset(map(len, _READ_RAW))


def read_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers this module reads, from (name, value) byte pairs in any case (httpx's
    `Headers.raw`, an ASGI scope's headers): cheaper than decoding every header."""
    found: dict[str, str] = {}
    for name, value in raw:
        if len(name) in _READ_LENGTHS:
            lowered = name.lower()
            if lowered in _READ_RAW:
                found[lowered.decode()] = value.decode("latin-1")
    return found


def read_lowered(triples: Iterable[tuple[bytes, bytes, bytes]]) -> dict[str, str]:
    """`read_headers` from (name, lower-case name, value) byte triples: the form httpx and
    httpx2 keep their headers in, with the names already lower-cased."""
    found: dict[str, str] = {}
    for _, lowered, value in triples:
        if lowered in _READ_RAW:
            found[lowered.decode()] = value.decode("latin-1")
    return found


def read_library_headers(headers: Any) -> dict[str, str]:
    """The headers the capture reads, from an httpx or httpx2 `Headers`.

    Both libraries keep (name, lower-case name, value) triples in `Headers._list`. Reading them
    costs less than half of going through the public `Headers.raw`, which builds a list of
    pairs whose names must then be lower-cased again: 13k against 29k instructions for the
    openai SDK's 18 request headers. It is a private attribute, so it is checked, not trusted:
    anything else takes the public path. `test_capture_headers.py` fails if an installed
    version stops offering it, rather than letting the capture slow down unseen."""
    triples = getattr(headers, "_list", None)
    if type(triples) is list:
        try:
            if not triples or type(triples[0][1]) is bytes:
                return read_lowered(triples)
        except (TypeError, ValueError, IndexError, AttributeError):
            pass
    return read_headers(headers.raw)
