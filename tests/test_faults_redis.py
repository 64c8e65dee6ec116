"""Fault injection on the Redis side, with the real pipeline: app clients (in-test asyncio, the
library as apps use it) -> redis-server process -> `vllm-mw worker` subprocesses -> files.

Each test measures the client call latency before the fault (baseline) and during it, and
counts records sent = distinct records stored, duplicates = 0.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis
from vllm_middleware import VLLMMiddleware
from vllm_middleware._redis_sink import RedisStreamSink
from vllm_middleware.testing import RedisServerProcess

from .conftest import WorkerFactory
from .faults_support import Load, mock_http, report, stored, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MW_REDIS_TIMEOUT", "1.0")


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.2)


async def run_fault(
    tag: str,
    url: str,
    log_dir: Path,
    inject: Callable[[], object],
    heal: Callable[[], object],
    *,
    hold: float = 3.0,
) -> tuple[Load, float, float, RedisStreamSink]:
    """Baseline traffic, the fault for `hold` seconds, recovery; returns the load and the maxima."""
    http = mock_http()
    client = VLLMMiddleware(http_client=http, redis_url=url, host=f"app-{tag}")
    sink = client._sink
    assert isinstance(sink, RedisStreamSink)
    load = Load(client, tag).start()
    t0 = time.perf_counter()
    await asyncio.sleep(1.5)
    t_fault = time.perf_counter()
    await asyncio.to_thread(inject)
    await asyncio.sleep(hold)
    await asyncio.to_thread(heal)
    await asyncio.sleep(1.5)
    t_end = time.perf_counter()
    await load.stop()
    await client.close()
    await http.aclose()
    baseline = load.max_latency_ms(t0, t_fault)
    during = load.max_latency_ms(t_fault, t_end)
    return load, baseline, during, sink


async def check_all_stored(
    fault: str, load: Load, log_dir: Path, baseline: float, during: float, timeout: float = 60
) -> None:
    sent = {(load.tag, s) for s in load.sent}
    await until(lambda: set(stored(log_dir, load.tag)) >= sent, timeout, f"{fault}: all stored")
    await asyncio.sleep(0.5)  # let any duplicate show up
    found = stored(log_dir, load.tag)
    report(fault, len(sent), found, baseline_ms=baseline, fault_ms=during)
    assert set(found) == sent
    assert max(found.values()) == 1, "duplicates in the files"


async def test_redis_stopped_and_restarted_with_aof(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    worker = start_worker(redis_server.url, log_dir, "w-restart", env=worker_env())
    load, baseline, during, sink = await run_fault(
        "restart", redis_server.url, log_dir, redis_server.stop, redis_server.start
    )
    assert sink.counters.spooled > 0 and sink.counters.replayed == sink.counters.spooled
    assert sink.counters.dropped == 0
    await check_all_stored("Redis stopped 3 s and restarted (AOF)", load, log_dir, baseline, during)
    assert worker.poll() is None, "the worker must survive a Redis restart"
    assert during < 250  # the request path never waits on Redis


async def test_redis_hung_by_sigstop(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    worker = start_worker(redis_server.url, log_dir, "w-hang", env=worker_env())
    load, baseline, during, sink = await run_fault(
        "hang", redis_server.url, log_dir, redis_server.pause, redis_server.resume
    )
    assert sink.counters.spooled > 0 and sink.counters.dropped == 0
    await check_all_stored("Redis hung (SIGSTOP) 3 s", load, log_dir, baseline, during)
    assert worker.poll() is None
    assert during < 250


async def test_redis_maxmemory_reached(start_worker: WorkerFactory, tmp_path: Path) -> None:
    server = RedisServerProcess(tmp_dir=tmp_path / "oom", appendonly=True, maxmemory="64mb")
    server.start()
    try:
        log_dir = tmp_path / "logs"
        worker = start_worker(server.url, log_dir, "w-oom", env=worker_env())
        admin = redis.Redis.from_url(server.url)

        def fill() -> None:
            # maxmemory below what Redis holds (noeviction): every write is refused, as when
            # data filled it; deterministic, unlike racing the workers that free memory.
            admin.config_set("maxmemory", "1mb")
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                admin.xadd("probe", {"a": "b"})

        def free() -> None:
            admin.config_set("maxmemory", "64mb")

        load, baseline, during, sink = await run_fault("oom", server.url, log_dir, fill, free)
        assert sink.counters.spooled > 0 and sink.counters.dropped == 0
        await check_all_stored("Redis maxmemory reached 3 s", load, log_dir, baseline, during)
        assert worker.poll() is None
        admin.close()
    finally:
        server.cleanup()


async def test_client_memory_stays_bounded_while_redis_is_down(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """Sustained load with Redis down: the buffer drains to the spool, memory stays flat."""
    log_dir = tmp_path / "logs"
    start_worker(redis_server.url, log_dir, "w-mem", env=worker_env())
    http = mock_http()
    client = VLLMMiddleware(http_client=http, redis_url=redis_server.url, host="app-mem")
    sink = client._sink
    assert isinstance(sink, RedisStreamSink)
    process = psutil.Process(os.getpid())
    load = Load(client, "mem", loops=8, pause=0, pad=1000).start()
    t0 = time.perf_counter()
    await asyncio.sleep(1.0)
    await asyncio.to_thread(redis_server.stop)
    t_fault = time.perf_counter()
    max_buffered = 0
    samples: list[tuple[int, int]] = []  # (RSS, records spooled so far)
    for _ in range(40):  # 8 s of sustained load into a dead Redis
        await asyncio.sleep(0.2)
        max_buffered = max(max_buffered, sink.buffered)
        samples.append((process.memory_info().rss, sink.counters.spooled))
    sent_during = len(load.sent)
    await asyncio.to_thread(redis_server.start)
    t_end = time.perf_counter()
    await load.stop()
    await client.close()
    await http.aclose()
    # Flat, not growing with the traffic: compare the second half of the outage to the first
    # (the first seconds include the allocator reaching its working set).
    rss_mid, spooled_mid = samples[len(samples) // 2]
    rss_max = max(rss for rss, _ in samples[len(samples) // 2 :])
    spooled_mb = (samples[-1][1] - spooled_mid) * 1.3 / 1024
    growth_mb = (rss_max - rss_mid) / 2**20
    print(
        f"\nmemory while Redis was down: {sent_during} records sent, max buffered "
        f"{max_buffered}, spooled {sink.counters.spooled}; second half: ~{spooled_mb:.0f} MB "
        f"of records spooled, RSS growth {growth_mb:.1f} MB"
    )
    assert sink.counters.spooled > 5000 and sink.counters.dropped == 0
    assert max_buffered < 15_000  # well under max_buffer (50 000): the spool keeps up
    assert growth_mb < max(10.0, spooled_mb / 3)
    await check_all_stored(
        "Redis down 8 s, sustained load (memory bound)",
        load,
        log_dir,
        load.max_latency_ms(t0, t_fault),
        load.max_latency_ms(t_fault, t_end),
        timeout=90,
    )
