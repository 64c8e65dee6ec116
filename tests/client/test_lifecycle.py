"""A client's life: records buffered when it is dropped unclosed or left at interpreter exit
are saved, a client outlives `asyncio.run()`, and clients are cheap to create (they share one
embedded writer and its files)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from vllm_middleware import (
    ConfigurationError,
    VLLMMiddleware,
    iter_log_files,
    load_logs,
)
from vllm_middleware._sinks import _destination
from vllm_middleware._sinks._spool import Spool
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

MODEL = "vllm:qwen-2.5-omni-7b"
HELLO = [{"role": "user", "content": "hello"}]
REPLY = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}


def reply(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=REPLY)


@pytest.fixture(autouse=True)
def _no_env_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


def run_app(body: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `body` in a fresh interpreter: three calls on a client it never closes, records
    held back by a long flush interval, then the interpreter exits."""
    program = textwrap.dedent(
        """
        import asyncio, httpx, sys
        from vllm_middleware import VLLMMiddleware

        REPLY = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}

        def handler(request):
            return httpx.Response(200, json=REPLY)

        async def calls(client, n):
            for _ in range(n):
                await client.completions("x", model="m")
            print(client.get_statistics()["client"]["buffered"], flush=True)
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=True,
    )


def test_records_buffered_at_exit_are_written_embedded(tmp_path: Path) -> None:
    done = run_app(
        f"""
        async def main():
            http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            client = VLLMMiddleware(
                base_url="http://up/v1", log_dir={str(tmp_path)!r}, http_client=http,
                flush_interval=60,
            )
            await calls(client, 3)

        asyncio.run(main())
        """
    )
    assert done.stdout.split() == ["3"], "the records were not in memory at exit"
    assert len(load_logs(tmp_path)) == 3


def test_records_buffered_at_exit_reach_redis(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    done = run_app(
        f"""
        async def main():
            http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            client = VLLMMiddleware(
                base_url="http://up/v1", redis_url={redis_server.url!r}, http_client=http,
                flush_interval=60,
            )
            await calls(client, 3)

        asyncio.run(main())
        """
    )
    assert done.stdout.split() == ["3"]
    assert sum(stream_counts(redis_server)) == 3


def test_records_buffered_at_exit_are_spooled_when_redis_is_down(
    tmp_path: Path, spool_dir: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    done = run_app(
        f"""
        async def main():
            http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            client = VLLMMiddleware(
                base_url="http://up/v1", redis_url={url!r}, http_client=http, flush_interval=60
            )
            await calls(client, 3)

        asyncio.run(main())
        """
    )
    assert done.stdout.split() == ["3"]
    assert spooled_records(spool_dir) == 3


def stream_counts(server: RedisServerProcess) -> list[int]:
    async def read() -> list[int]:
        client = aioredis.Redis.from_url(server.url)
        try:
            rows = await client.xrange("vllm:logs")
        finally:
            await client.aclose()
        return [int(fields[b"n"]) for _, fields in rows]

    return asyncio.run(read())


def spooled_records(root: Path) -> int:
    total = 0
    for directory in root.iterdir():
        spool = Spool(directory, max_bytes=10**8)
        spool.adopt_orphans()
        while (group := spool.next_group()) is not None:
            total += len(group.entries)
            spool.commit(group)
        spool.close()
    return total


async def test_a_client_collected_unclosed_warns_and_saves_its_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    client = VLLMMiddleware(
        base_url="http://up/v1", log_dir=tmp_path, http_client=http, flush_interval=60
    )
    for _ in range(3):
        await client.completions("x", model="m")
    sink = client._sink
    assert sink is not None and sink.buffered == 3
    with caplog.at_level(logging.WARNING, "vllm_middleware"), pytest.warns(ResourceWarning):
        del client
        gc.collect()
    assert "without close()" in caplog.text
    assert await sink.wait_durable(20)
    assert len(load_logs(tmp_path)) == 3
    await http.aclose()


async def test_a_redis_client_collected_unclosed_ships_its_records(
    redis_server: RedisServerProcess,
) -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    client = VLLMMiddleware(
        base_url="http://up/v1", redis_url=redis_server.url, http_client=http, flush_interval=60
    )
    for _ in range(3):
        await client.completions("x", model="m")
    sink = client._sink
    assert sink is not None
    with pytest.warns(ResourceWarning):
        del client
        gc.collect()
    assert await asyncio.wait_for(asyncio.wrap_future(sink.close_soon()), 20) is None
    assert sink.counters.shipped == 3
    await http.aclose()


def test_a_client_reused_across_asyncio_run_keeps_every_record(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    client = VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path)

    async def calls(n: int) -> None:
        for _ in range(n):
            await client.chat_completion(HELLO, model=MODEL)

    asyncio.run(calls(3))
    asyncio.run(calls(4))
    asyncio.run(client.close())
    records = load_logs(tmp_path)
    assert len(records) == 7 and all(r.error is None for r in records)


def test_an_injected_http_client_on_a_second_loop_is_refused_before_anything_is_lost(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    http = httpx.AsyncClient()
    client = VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, http_client=http)

    async def calls(n: int) -> None:
        for _ in range(n):
            await client.chat_completion(HELLO, model=MODEL)

    asyncio.run(calls(2))
    with pytest.raises(ConfigurationError, match="another event loop"):
        asyncio.run(calls(1))
    asyncio.run(client.close())
    assert len(load_logs(tmp_path)) == 2


async def test_clients_in_sequence_share_one_writer_and_its_files(tmp_path: Path) -> None:
    """A client per request: one writer process, and the files do not grow with clients."""
    sinks: set[Any] = set()
    for _ in range(20):
        async with (
            httpx.AsyncClient(transport=httpx.MockTransport(reply)) as http,
            VLLMMiddleware(base_url="http://up/v1", log_dir=tmp_path, http_client=http) as c,
        ):
            await c.completions("x", model="m")
        sinks.add(c._sink)
    (sink,) = sinks
    process = getattr(sink.sink, "process")  # noqa: B009 - FileSink only
    assert process.starts == 1, f"{process.starts} writer processes for 20 clients"
    assert len(list(iter_log_files(tmp_path))) == 1
    assert len(load_logs(tmp_path)) == 20


async def test_shared_writer_killed_between_clients_keeps_exactly_once(tmp_path: Path) -> None:
    """Two clients share a writer; it is killed in between: every record lands once."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    first = VLLMMiddleware(base_url="http://up/v1", log_dir=tmp_path, http_client=http)
    second = VLLMMiddleware(base_url="http://up/v1", log_dir=tmp_path, http_client=http)
    assert first._sink is second._sink and first._sink is not None
    sink = first._sink
    for _ in range(10):
        await first.completions("x", model="m")
    assert await sink.wait_durable(20)
    pid = getattr(sink.sink, "process").pid  # noqa: B009 - FileSink only
    os.kill(pid, signal.SIGKILL)
    for _ in range(10):
        await second.completions("x", model="m")
    await first.close()
    await second.close()
    await http.aclose()
    ids = [r.request_id for r in load_logs(tmp_path)]
    assert len(ids) == len(set(ids)) == 20


async def test_a_shared_writer_no_client_takes_closes_after_its_idle_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer outlives its last client only briefly (not as long as the app)."""
    monkeypatch.setattr(_destination, "_IDLE_CLOSE_S", 0.2)
    http = httpx.AsyncClient(transport=httpx.MockTransport(reply))
    async with VLLMMiddleware(base_url="http://up/v1", log_dir=tmp_path, http_client=http) as c:
        await c.completions("x", model="m")
    sink = c._sink
    pid = getattr(sink.sink, "process").pid  # noqa: B009 - FileSink only
    assert sink is not None and pid is not None
    for _ in range(500):
        if sink.closing and not process_exists(pid):
            break
        await asyncio.sleep(0.02)
    assert sink.closing and not process_exists(pid), "the idle writer kept running"
    async with VLLMMiddleware(base_url="http://up/v1", log_dir=tmp_path, http_client=http) as c:
        await c.completions("x", model="m")
    assert c._sink is not sink
    await http.aclose()
    assert len(load_logs(tmp_path)) == 2


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_redis_clients_in_sequence_share_one_sink(
    redis_server: RedisServerProcess, redis: aioredis.Redis
) -> None:
    sinks: set[Any] = set()
    async with httpx.AsyncClient(transport=httpx.MockTransport(reply)) as http:
        for _ in range(10):
            async with VLLMMiddleware(
                base_url="http://up/v1", redis_url=redis_server.url, http_client=http
            ) as c:
                await c.completions("x", model="m")
            sinks.add(c._sink)
    assert len(sinks) == 1
    rows = await redis.xrange("vllm:logs")
    assert sum(int(fields[b"n"]) for _, fields in rows) == 10
