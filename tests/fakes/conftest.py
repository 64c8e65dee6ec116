"""Fixtures of the fake vLLM server's tests: a server per wire flavour, and a client of it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from vllm_middleware_testing import FakeVLLMServer

from .vllm_support import FLAVORS


@pytest.fixture(params=FLAVORS)
def server(request: pytest.FixtureRequest) -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer(flavor=request.param) as fake:
        yield fake


@pytest.fixture
def client(server: FakeVLLMServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        yield http
