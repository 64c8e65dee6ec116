"""Shipping makes progress whatever the request path does: callers that never yield to the
event loop (an upstream answering in-process) must not starve it, nor a caller that yields at
every call (the loop then releases the GIL thousands of times a second). The non-yielding tests
count records shipped while the app's loop never got a turn, and records dropped."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware._keys import FIELD_COUNT
from vllm_middleware._record import RecordEntry
from vllm_middleware._sinks._destination import file_shipper
from vllm_middleware._sinks._shipping import ShippingSettings
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


# -- a yielding caller keeps the loop busy (c=1) ----------------------------------------------
# Each turn of the app's loop releases the GIL (epoll_wait) and wakes the waiting shipping
# thread, which restarts its 5 ms forced-switch wait; the loop thread takes the GIL back before
# the woken thread runs. On a quiet machine that starved the thread for seconds. On a loaded
# one the forced switch fires now and then by chance, so the test removes that chance: it sets
# the switch interval far beyond the test and, with two CPUs, keeps the app's thread and the
# shipping thread on different ones (a thread woken on the CPU of the GIL holder would preempt
# it and win). What it then requires does not depend on timing precision: no record waits in
# memory for a whole second (50 ms `flush_interval`), while ~1,000+ calls a second are made.
YIELD_SECONDS = 4.0
MAX_WAIT_S = 1.0


async def yielding_handler(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(0)  # one suspension per call, as real I/O has
    return httpx.Response(200, json=REPLY)


@pytest.fixture
def forced_switch_off() -> Any:
    interval = sys.getswitchinterval()
    affinity = os.sched_getaffinity(0)
    sys.setswitchinterval(1000.0)
    try:
        yield sorted(affinity)
    finally:
        sys.setswitchinterval(interval)
        os.sched_setaffinity(0, affinity)


def pin_apart(cpus: list[int]) -> None:
    """This thread on one CPU, the sink's threads on another (when there are two)."""
    if len(cpus) < 2:
        return
    os.sched_setaffinity(0, {cpus[0]})
    for thread in threading.enumerate():
        if thread.name.startswith("vllm-mw-") and thread.native_id is not None:
            os.sched_setaffinity(thread.native_id, {cpus[1]})


async def check_yielding_caller(client: VLLMMiddleware, cpus: list[int]) -> int:
    """One caller, yielding once per call, for `YIELD_SECONDS`; returns the calls made."""
    sink = client._sink
    assert sink is not None
    await client.completions(prompt="warm-up", model="m")  # starts the thread (and writer)
    while sink.buffered:  # noqa: ASYNC110 - polls the sink's state
        await asyncio.sleep(0.01)
    pin_apart(cpus)
    counters = sink.counters
    base = counters.shipped
    made: list[float] = []  # when each record was submitted (records ship in order)
    longest = 0.0
    end = time.monotonic() + YIELD_SECONDS
    while (now := time.monotonic()) < end:
        shipped = counters.shipped - base
        if shipped < len(made):
            longest = max(longest, now - made[shipped])
        await client.completions(prompt="x", model="m")
        made.append(time.monotonic())
    assert counters.dropped == 0
    assert longest < MAX_WAIT_S, (
        f"a record waited {longest:.2f} s in memory behind a yielding caller "
        f"({len(made)} calls, {counters.shipped - base} shipped)"
    )
    return len(made) + 1


async def test_yielding_caller_embedded(tmp_path: Path, forced_switch_off: list[int]) -> None:
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(yielding_handler)) as http,
        VLLMMiddleware(base_url="http://upstream/v1", log_dir=tmp_path, http_client=http) as client,
    ):
        calls = await check_yielding_caller(client, forced_switch_off)
    assert len(load_logs(tmp_path)) == calls


async def test_yielding_caller_redis(
    redis_server: RedisServerProcess, redis: aioredis.Redis, forced_switch_off: list[int]
) -> None:
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(yielding_handler)) as http,
        VLLMMiddleware(
            base_url="http://upstream/v1", http_client=http, redis_url=redis_server.url
        ) as client,
    ):
        calls = await check_yielding_caller(client, forced_switch_off)
    records = 0
    async for _, fields in stream_entries(redis, client.keys.stream):
        records += int(fields[FIELD_COUNT])
    assert records == calls


# -- submit from many threads at once -----------------------------------------------------------
THREADS = 8
SUBMITS_EACH = 3_000


def test_submit_from_many_threads_while_closing(tmp_path: Path) -> None:
    """A sync client's thread pool shares one sink: every record submitted from any thread,
    even while the sink closes, ends up in the files or counted as dropped, exactly once."""
    sink = file_shipper(
        tmp_path, max_bytes=1 << 30, shipping=ShippingSettings(max_buffer=1_000_000)
    )
    start = threading.Barrier(THREADS + 1)
    halfway = threading.Barrier(THREADS + 1)

    def submitter(index: int) -> None:
        entries = [
            RecordEntry("2026-11-30", "h", False, orjson.dumps({"request_id": f"{index}-{i}"}))
            for i in range(SUBMITS_EACH)
        ]
        start.wait()
        for i, entry in enumerate(entries):
            if i == SUBMITS_EACH // 2:
                halfway.wait()
            sink.submit(entry)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=submitter, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        start.wait()
        halfway.wait()
        closed = sink.close_soon(30)  # while the second halves are being submitted
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    closed.result(60)
    counters = sink.counters
    records = load_logs(tmp_path)
    ids = [record["request_id"] for record in records]
    assert counters.submitted == THREADS * SUBMITS_EACH
    assert len(set(ids)) == len(ids), "a record written twice"
    assert len(ids) + counters.dropped == THREADS * SUBMITS_EACH
    assert counters.shipped == len(ids)
    assert sink.buffered == 0
