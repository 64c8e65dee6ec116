"""Streams that end early: exactly one record each, and nothing leaks over many iterations."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware_testing import FakeVLLMServer

MESSAGES = [{"role": "user", "content": "one two three four five six seven eight"}]


@pytest.fixture
def server() -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer() as fake:
        yield fake


def pool_state(client: VLLMMiddleware) -> tuple[int, int]:
    """(requests holding a connection, connections) in the client's httpx pool."""
    pool: Any = client._http._transport._pool  # type: ignore[attr-defined]
    return len(pool._requests), len(pool.connections)


async def break_after(client: VLLMMiddleware, k: int) -> None:
    async with await client.chat_completion(MESSAGES, stream=True) as stream:
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == k:
                break


async def abandon_after(client: VLLMMiddleware, k: int) -> None:
    stream = await client.chat_completion(MESSAGES, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == k:
            break
    del stream  # never closed: the finalizer must log and free the connection


async def consume_slowly(client: VLLMMiddleware, started: asyncio.Event) -> None:
    async with await client.chat_completion(MESSAGES, stream=True) as stream:
        async for _ in stream:
            started.set()


async def cancel_midway(client: VLLMMiddleware) -> None:
    started = asyncio.Event()
    task = asyncio.create_task(consume_slowly(client, started))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_break_inside_async_with(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    await break_after(client, 3)
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "abandoned"
    assert record["chunks"] == 3
    assert record["response"]["choices"][0]["message"]["content"] == "Echo: one"
    assert "closed by the caller" in record["error"]


async def test_closing_after_the_last_choice_finished_completes(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    async with await client.chat_completion(MESSAGES, stream=True) as stream:
        async for chunk in stream:
            if chunk["choices"][0]["finish_reason"]:
                break
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "completed" and record["usage"] is not None


async def test_garbage_collected_stream(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    await abandon_after(client, 2)
    gc.collect()
    await asyncio.sleep(0.05)
    assert pool_state(client)[0] == 0
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "abandoned"
    assert "garbage-collected" in record["error"]


async def test_never_iterated_stream(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    await client.chat_completion(MESSAGES, stream=True)  # result dropped at once
    gc.collect()
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "abandoned" and record["chunks"] == 0


async def test_cancelled_task(server: FakeVLLMServer, tmp_path: Path) -> None:
    server.token_delay = 0.05
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    await cancel_midway(client)
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "cancelled"
    assert record["chunks"] >= 1


async def test_no_leaks_over_many_streams(server: FakeVLLMServer, tmp_path: Path) -> None:
    server.token_delay = 0.001
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    baseline_tasks = len(asyncio.all_tasks())
    iterations = 200
    for i in range(iterations):
        kind = i % 4
        if kind == 0:
            await break_after(client, 1 + i % 5)
        elif kind == 1:
            await abandon_after(client, 1 + i % 5)
        elif kind == 2:
            await cancel_midway(client)
        else:
            async with await client.chat_completion(MESSAGES, stream=True) as stream:
                async for _ in stream:
                    pass
        if i % 50 == 49:
            gc.collect()
            # Finalizers hand their clean-up to tasks; on a loaded machine give them a moment.
            for _ in range(250):
                if not client._background and pool_state(client)[0] == 0:
                    break
                await asyncio.sleep(0.02)
            active, connections = pool_state(client)
            assert active == 0
            assert connections <= 5
            assert len(asyncio.all_tasks()) <= baseline_tasks + 2  # + the sink's flush task
            assert not client._background
    await client.close()
    records = list(load_logs(tmp_path))
    assert len(records) == iterations
    assert len({r["request_id"] for r in records}) == iterations
    ends = sorted({r["stream_end"] for r in records})
    assert ends == ["abandoned", "cancelled", "completed"]


@pytest.mark.parametrize("consume", [1, 100])
async def test_a_cancel_at_any_point_gives_the_connection_back(
    server: FakeVLLMServer, tmp_path: Path, consume: int
) -> None:
    """The caller's task is cancelled after 0, 1, 2... loop turns, so the cancel lands at every
    point of a stream's life in turn: while the connection is released after [DONE] too, where
    httpcore, cut short, kept the connection checked out for good."""
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")

    async def read() -> None:
        async with await client.chat_completion(MESSAGES, stream=True) as stream:
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == consume:
                    break

    leaked = []
    for steps in list(range(40)) * 5:
        task = asyncio.create_task(read())
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):  # a release that had to wait finishes in the background
            if pool_state(client)[0] == 0:
                break
            await asyncio.sleep(0.01)
        if pool_state(client)[0]:
            leaked.append(steps)
            break
    await client.close()
    assert leaked == []
    # One record per call that started (a task cancelled before its first turn made none).
    records = load_logs(tmp_path)
    assert 0 < len(records) <= 200 and all(r["stream"] for r in records)
