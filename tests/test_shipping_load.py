"""Shipping makes progress whatever the request path does: callers that never yield to the
event loop (an upstream answering in-process) must not starve it. No timings: the test counts
records shipped while the app's loop never got a turn, and records dropped."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware._keys import FIELD_COUNT
from vllm_middleware_testing import RedisServerProcess

REPLY = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}
CALLERS = 64
CALLS_EACH = 250  # 16,000 records: four times the buffer below
MAX_BUFFER = 4_000


def plain_handler(request: httpx.Request) -> httpx.Response:
    """A plain function: nothing in the call ever suspends, so the app's loop never turns."""
    return httpx.Response(200, json=REPLY)


async def burst(client: VLLMMiddleware) -> None:
    async def caller() -> None:
        for _ in range(CALLS_EACH):
            await client.completions(prompt="x", model="m")

    await asyncio.gather(*(caller() for _ in range(CALLERS)))


def sink_counters(client: VLLMMiddleware) -> Any:
    sink = client._sink
    assert sink is not None
    return sink.counters


async def check_non_yielding_callers(client: VLLMMiddleware) -> None:
    await burst(client)
    # Still inside the same loop turn for all we know: whatever left memory left it without
    # the app's loop.
    counters = sink_counters(client)
    assert counters.dropped == 0, f"{counters.dropped} records dropped"
    assert counters.shipped > 0, "nothing shipped while the loop was busy"
    assert counters.high_water < MAX_BUFFER


@pytest.fixture(autouse=True)
def _no_env_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


async def test_non_yielding_callers_embedded(tmp_path: Path) -> None:
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(plain_handler)) as http,
        VLLMMiddleware(
            base_url="http://upstream/v1", log_dir=tmp_path, http_client=http, max_buffer=MAX_BUFFER
        ) as client,
    ):
        await check_non_yielding_callers(client)
    assert len(load_logs(tmp_path)) == CALLERS * CALLS_EACH


async def test_non_yielding_callers_redis(
    tmp_path: Path, redis_server: RedisServerProcess, redis: aioredis.Redis
) -> None:
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(plain_handler)) as http,
        VLLMMiddleware(
            base_url="http://upstream/v1",
            http_client=http,
            redis_url=redis_server.url,
            max_buffer=MAX_BUFFER,
        ) as client,
    ):
        await check_non_yielding_callers(client)
        assert sink_counters(client).spooled == 0, "Redis was up: nothing should be spooled"
    records = 0
    async for _, fields in stream_entries(redis, client.keys.stream):
        records += int(fields[FIELD_COUNT])
    assert records == CALLERS * CALLS_EACH


async def stream_entries(redis: aioredis.Redis, stream: str) -> Any:
    start = "-"
    while True:
        batch = await redis.xrange(stream, min=start, count=1000)
        if not batch:
            return
        for entry_id, fields in batch:
            yield entry_id, fields
        start = "(" + batch[-1][0].decode()
