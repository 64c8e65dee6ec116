"""Errors a newcomer meets first say where the call went and what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_middleware import APIConnectionError, NotFoundError, VLLMMiddleware, load_logs
from vllm_middleware_testing import FakeVLLMServer

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_a_connection_failure_names_the_url(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/v1/chat/completions"
    async with VLLMMiddleware("http://127.0.0.1:1/v1", log_dir=tmp_path, redis_url="") as mw:
        with pytest.raises(APIConnectionError) as caught:
            await mw.chat_completion(MESSAGES, model="m")
    assert str(caught.value).startswith(
        "connection failed: http://127.0.0.1:1/v1/chat/completions: "
    )
    (record,) = load_logs(tmp_path)
    assert url in record.error


async def test_a_404_from_a_base_url_without_v1_hints_at_it(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    root = fake_vllm.base_url.removesuffix("/v1")
    async with VLLMMiddleware(root, log_dir=tmp_path, redis_url="") as mw:
        with pytest.raises(NotFoundError) as caught:
            await mw.chat_completion(MESSAGES, model="m")
    assert f"{root}/chat/completions: is /v1 missing from base_url?" in str(caught.value)


async def test_a_404_under_v1_has_no_such_hint(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path, redis_url="") as mw:
        with pytest.raises(NotFoundError) as caught:
            await mw.chat_completion(MESSAGES, model="no-such-model")
    assert "/v1 missing" not in str(caught.value)
