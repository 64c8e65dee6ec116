"""How the capture transports read headers: httpx's and httpx2's own lower-cased triples when
they are there (the cheap path), the public `Headers.raw` otherwise, the same answer either way.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

import pytest
from vllm_middleware._wire_headers import read_headers, read_library_headers, read_lowered


def _libraries() -> list[ModuleType]:
    found = []
    for name in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name))
    return found


LIBRARIES = _libraries()
SENT = [
    ("Content-Type", "application/json"),
    ("X-VLLM-MW-Metadata", '{"team": "search"}'),
    ("x-vllm-mw-host", "app-7"),
    ("X-Stainless-Retry-Count", "0"),
    ("Authorization", "Bearer secret"),
    ("X-Request-ID", "rid-1"),
    ("Accept", "application/json"),
]
EXPECTED = {
    "content-type": "application/json",
    "x-vllm-mw-metadata": '{"team": "search"}',
    "x-vllm-mw-host": "app-7",
    "x-stainless-retry-count": "0",
    "x-request-id": "rid-1",
}


@pytest.mark.parametrize("lib", LIBRARIES, ids=lambda lib: lib.__name__)
def test_each_library_keeps_the_triples_the_cheap_path_reads(lib: ModuleType) -> None:
    # The capture relies on a private attribute of both libraries: this fails on a version
    # that changes it, instead of the capture quietly falling back to the slower public path.
    headers = lib.Headers(SENT)
    triples = headers._list
    assert type(triples) is list
    assert all(len(t) == 3 and all(type(part) is bytes for part in t) for t in triples)
    assert [t[1] for t in triples] == [name.lower().encode() for name, _ in SENT]
    assert read_lowered(triples) == EXPECTED


@pytest.mark.parametrize("lib", LIBRARIES, ids=lambda lib: lib.__name__)
def test_the_cheap_path_and_the_public_one_agree(lib: ModuleType) -> None:
    headers = lib.Headers(SENT)
    assert read_library_headers(headers) == read_headers(headers.raw) == EXPECTED
    empty = lib.Headers()
    assert read_library_headers(empty) == {}
    latin = lib.Headers([(b"X-Request-Id", b"caf\xe9")])  # any byte: decoded as latin-1
    assert read_library_headers(latin) == read_headers(latin.raw) == {"x-request-id": "caf\xe9"}


class _PublicOnly:
    """Headers of some other shape: only the public `raw` pairs."""

    def __init__(self, pairs: list[tuple[str, str]], private: Any = None) -> None:
        self.raw = [(name.encode(), value.encode("latin-1")) for name, value in pairs]
        if private is not None:
            self._list = private


@pytest.mark.parametrize(
    "private",
    [
        None,  # no private list at all
        ("not", "a", "list"),
        [("content-type", "content-type", "application/json")],  # str, not bytes
        [(b"Content-Type", b"content-type")],  # pairs, not triples
        [b"garbage"],
    ],
    ids=["missing", "not-a-list", "str-names", "pairs", "garbage"],
)
def test_anything_else_takes_the_public_path(private: Any) -> None:
    assert read_library_headers(_PublicOnly(SENT, private)) == EXPECTED
