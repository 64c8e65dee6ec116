"""LangChain's `ChatOpenAI` captured through the openai SDK it wraps (langchain-openai is a
test dependency only; this module skips without it)."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

import pytest
from vllm_middleware import instrument, load_logs
from vllm_middleware_testing import FakeVLLMServer

langchain_openai = pytest.importorskip("langchain_openai")


def http_parts() -> tuple[Any, Any, Any]:
    """(HTTP library, CaptureTransport, AsyncCaptureTransport) of this environment's SDK:
    httpx2 for openai 3, httpx before."""
    openai = importlib.import_module("openai")
    if int(openai.__version__.split(".")[0]) >= 3:
        capture = importlib.import_module("vllm_middleware.httpx2")
        library = importlib.import_module("httpx2")
    else:
        capture = importlib.import_module("vllm_middleware")
        library = importlib.import_module("httpx")
    return library, capture.CaptureTransport, capture.AsyncCaptureTransport


async def test_chat_openai_with_instrumented_clients(tmp_path: Path) -> None:
    with FakeVLLMServer() as server:
        llm = langchain_openai.ChatOpenAI(
            model=server.model, base_url=server.base_url, api_key="sk-lc"
        )
        instrument(llm.root_client, log_dir=tmp_path, metadata={"via": "root"})
        instrument(llm.root_async_client, log_dir=tmp_path, metadata={"via": "root"})
        assert llm.invoke("hello sync").content
        assert (await llm.ainvoke("hello async")).content
        chunks = [chunk.content async for chunk in llm.astream("hello stream")]
        llm.root_client.close()
        await llm.root_async_client.close()
    records = sorted((r.to_dict() for r in load_logs(tmp_path)), key=lambda r: r["timestamp"])
    assert [r["messages"][-1]["content"] for r in records] == [
        "hello sync",
        "hello async",
        "hello stream",
    ]
    assert records[2]["stream_end"] == "completed" and "".join(chunks)
    assert all(r["metadata"] == {"via": "root"} for r in records)


def test_chat_openai_with_capturing_http_clients(tmp_path: Path) -> None:
    library, sync_transport, async_transport = http_parts()
    with FakeVLLMServer() as server:
        http_client = library.Client(transport=sync_transport(log_dir=tmp_path))
        http_async_client = library.AsyncClient(transport=async_transport(log_dir=tmp_path))
        llm = langchain_openai.ChatOpenAI(
            model=server.model,
            base_url=server.base_url,
            api_key="sk-lc",
            http_client=http_client,
            http_async_client=http_async_client,
        )
        assert llm.invoke("hello").content
        http_client.close()
        asyncio.run(http_async_client.aclose())
    [record] = [r.to_dict() for r in load_logs(tmp_path)]
    assert record["endpoint"] == "chat/completions" and record["response"]["choices"]
