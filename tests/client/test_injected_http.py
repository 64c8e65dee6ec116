"""An injected `http_client`, configured the way users configure one: the middleware's own
`base_url` applies to every call, and whatever the HTTP layer raises reaches the caller as
one of the package's exceptions, recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from vllm_middleware import (
    APIConnectionError,
    ConfigurationError,
    InvalidRequestError,
    VLLMMiddleware,
    VLLMMiddlewareError,
    load_logs,
)
from vllm_middleware_testing import FakeVLLMServer

MODEL = "vllm:qwen-2.5-omni-7b"
HELLO = [{"role": "user", "content": "hello"}]

# What users pass: a plain client, one pointed elsewhere, one with custom limits.
INJECTED: dict[str, Callable[[], httpx.AsyncClient]] = {
    "plain": lambda: httpx.AsyncClient(),
    "other-base-url": lambda: httpx.AsyncClient(base_url="http://127.0.0.1:9/elsewhere"),
    "custom-limits": lambda: httpx.AsyncClient(
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=2), timeout=30
    ),
}


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


@pytest.mark.parametrize("kind", sorted(INJECTED))
async def test_every_call_uses_the_middlewares_base_url(
    fake_vllm: FakeVLLMServer, tmp_path: Path, kind: str
) -> None:
    async with (
        INJECTED[kind]() as http,
        VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, http_client=http) as mw,
    ):
        reply = await mw.chat_completion(HELLO, model=MODEL)
        assert reply["choices"][0]["message"]["content"]
        text = await mw.completions("hello", model=MODEL)
        assert text["choices"][0]["text"]
        chunks = [c async for c in await mw.chat_completion(HELLO, model=MODEL, stream=True)]
        assert chunks
        chunks = [c async for c in await mw.completions("hi", model=MODEL, stream=True)]
        assert chunks
        assert MODEL in {m["id"] for m in (await mw.models())["data"]}
        assert await mw.health()
    records = load_logs(tmp_path)
    assert len(records) == 4
    assert all(r.status_code == 200 and r.error is None for r in records)


def test_a_base_url_the_http_layer_cannot_use_is_refused_at_construction(tmp_path: Path) -> None:
    """A base_url without a scheme, or with a port that is not a number, used to fail only at
    the first call (as a bare httpx or ValueError)."""
    for url in ("vllm-host:8000/v1", "http://vllm-host:port/v1", "http://a:b:c/v1"):
        with pytest.raises(ConfigurationError, match="base_url"):
            VLLMMiddleware(base_url=url, log_dir=tmp_path, enable_file_logging=False)


async def test_an_unsendable_url_is_a_package_error_and_recorded(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    """A URL httpx refuses to send (a NUL in the path) raised a bare httpx.InvalidURL."""
    async with (
        httpx.AsyncClient() as http,
        VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, http_client=http) as mw,
    ):
        with pytest.raises(VLLMMiddlewareError) as info:
            await mw.request("POST", "chat/completions\x00", json={"model": MODEL})
        assert isinstance(info.value, APIConnectionError | InvalidRequestError)
    records = load_logs(tmp_path)
    assert len(records) == 1 and records[0].error
    assert records[0].error_detail["kind"] in {"APIConnectionError", "InvalidRequestError"}


async def test_a_bad_header_value_is_an_invalid_request_and_recorded(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path) as mw:
        with pytest.raises(InvalidRequestError):
            bad: dict[str, object] = {"x-trace": 1}
            await mw.chat_completion(HELLO, model=MODEL, headers=bad)  # type: ignore[arg-type]
    (record,) = load_logs(tmp_path)
    assert record.error_detail["kind"] == "InvalidRequestError"
