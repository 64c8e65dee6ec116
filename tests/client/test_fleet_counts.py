"""Counts the clients report to the fleet's statistics in Redis mode: calls left out by
`sample_rate` (`Shipper.count_sampled_out`) travel to the stats hash with the batches, or on
their own when no record is there to carry them. A real redis-server, the real Redis sink."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from vllm_middleware import BadRequestError, VLLMMiddleware, get_statistics
from vllm_middleware._sinks._destination import mode_of
from vllm_middleware._sinks._shipping import Shipper
from vllm_middleware_testing import RedisServerProcess

REPLY = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}


@pytest.fixture(autouse=True)
def _no_env_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


def redis_client(url: str) -> tuple[httpx.AsyncClient, VLLMMiddleware]:
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _: httpx.Response(200, json=REPLY))
    )
    return http, VLLMMiddleware(base_url="http://upstream/v1", http_client=http, redis_url=url)


def sink_of(client: VLLMMiddleware) -> Shipper:
    sink = client._sink
    assert sink is not None and mode_of(sink) == "redis"
    return sink


async def test_sampled_out_reaches_the_fleet_statistics_and_the_cli(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    http, client = redis_client(redis_server.url)
    sink = sink_of(client)

    def count_many() -> None:
        for _ in range(1_000):
            sink.count_sampled_out()

    async with http, client:
        threads = [threading.Thread(target=count_many) for _ in range(4)]
        for thread in threads:
            thread.start()
        for _ in range(20):
            await client.completions(prompt="x", model="m")
        for thread in threads:
            thread.join()
        sink.count_sampled_out(5)
        await client.completions(prompt="x", model="m")
    assert sink.counters.sampled_out == 4_005
    stats = await asyncio.to_thread(get_statistics, redis_server.url)
    assert stats["sampled_out"] == 4_005
    assert stats["dropped_records"] == 0
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    command = ["stats", "--json", "--redis-url", redis_server.url]
    shown = subprocess.run(  # noqa: ASYNC221 - the command line, as a person runs it
        [sys.executable, "-m", "vllm_middleware._cli", *command],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["sampled_out"] == 4_005


async def test_sampled_out_without_any_record_is_reported_while_open(
    redis_server: RedisServerProcess, redis: aioredis.Redis
) -> None:
    """Every call sampled out: no batch carries the count, so it goes on its own."""
    http, client = redis_client(redis_server.url)
    sink = sink_of(client)
    async with http, client:
        await client.completions(prompt="x", model="m")  # starts the shipping thread
        sink.count_sampled_out(7)
        deadline = time.monotonic() + 30
        while await redis.hget(client.keys.stats, "sampled_out") != b"7":
            assert time.monotonic() < deadline, "the count never reached Redis"
            await asyncio.sleep(0.05)
        sink.count_sampled_out(2)  # reported when the client lets the sink go, at the latest
    assert await redis.hget(client.keys.stats, "sampled_out") == b"9"
    entries = await redis.xrange(client.keys.stream)
    assert len(entries) == 1, "a count on its own must add no stream entry"


async def test_a_damaged_counter_does_not_stop_records(
    redis_server: RedisServerProcess, redis: aioredis.Redis
) -> None:
    """Anyone can HSET the stats hash: the records still go, the bad counter is left alone
    (and reported), the good ones still count."""
    http, client = redis_client(redis_server.url)
    sink = sink_of(client)
    await redis.hset(client.keys.stats, mapping={"sampled_out": "abc", "dropped": "3"})
    async with http, client:
        sink.count_sampled_out(4)
        sink.count_dropped(2, "test")
        for _ in range(5):
            await client.completions(prompt="x", model="m")
    assert sink.counters.failed_batches == 0 and sink.counters.spooled == 0
    assert await redis.hget(client.keys.stats, "sampled_out") == b"abc"
    assert await redis.hget(client.keys.stats, "dropped") == b"5"
    stats = await asyncio.to_thread(get_statistics, redis_server.url)
    assert stats["damaged_fields"] == {"sampled_out": "abc"}
    assert stats["sampled_out"] == 0
    assert sum(1 for _ in await redis.xrange(client.keys.stream)) >= 1


async def test_calls_sampled_out_by_the_client_reach_the_fleet_statistics(
    redis_server: RedisServerProcess, redis: aioredis.Redis
) -> None:
    """The recorder tells the sink about each call `sample_rate` leaves out; errors are always
    recorded, never counted as sampled out."""
    transport = httpx.MockTransport(
        lambda request: httpx.Response(
            400 if b"fail" in request.content else 200,
            json={"error": {"message": "no"}} if b"fail" in request.content else REPLY,
        )
    )
    http = httpx.AsyncClient(transport=transport)
    client = VLLMMiddleware(
        base_url="http://upstream/v1", http_client=http, redis_url=redis_server.url, sample_rate=0
    )
    async with http, client:
        for _ in range(12):
            await client.completions(prompt="x", model="m")
        with pytest.raises(BadRequestError):
            await client.completions(prompt="fail", model="m")
    stats = await asyncio.to_thread(get_statistics, redis_server.url)
    assert stats["sampled_out"] == 12
    assert len(await redis.xrange(client.keys.stream)) == 1  # the error's record, kept
