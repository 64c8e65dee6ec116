"""Fault injection on the Redis side, with the real pipeline: app clients (in-test asyncio, the
library as apps use it) -> redis-server process -> `vllm-mw worker` subprocesses -> files.

Each test measures the client call latency before the fault (baseline) and during it, and
counts records sent = distinct records stored, duplicates = 0.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import Callable
from pathlib import Path

import orjson
import psutil
import pytest
import redis
from vllm_middleware import VLLMMiddleware
from vllm_middleware._sinks._shipping import Shipper
from vllm_middleware._sinks._spooling_sink import SpoolingSink
from vllm_middleware.storage import StreamKeys
from vllm_middleware_testing import RedisServerProcess

from ..conftest import WorkerFactory
from .faults_support import Load, check_all_stored, mock_http, report, stored, until, worker_env

pytestmark = pytest.mark.slow

KEYS = StreamKeys()


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MW_REDIS_TIMEOUT", "1.0")


async def run_fault(
    tag: str,
    url: str,
    log_dir: Path,
    inject: Callable[[], object],
    heal: Callable[[], object],
    *,
    hold: float = 3.0,
) -> tuple[Load, float, float, Shipper]:
    """Baseline traffic, the fault for `hold` seconds, recovery; returns the load and the maxima."""
    http = mock_http()
    client = VLLMMiddleware(http_client=http, redis_url=url, host=f"app-{tag}")
    sink = client._sink
    assert sink is not None and isinstance(sink.sink, SpoolingSink)
    load = Load(client, tag).start()
    t0 = time.perf_counter()
    await asyncio.sleep(1.5)
    t_fault = time.perf_counter()
    await asyncio.to_thread(inject)
    await asyncio.sleep(hold)
    await asyncio.to_thread(heal)
    await asyncio.sleep(1.5)
    t_end = time.perf_counter()
    load.fault_window = (t_fault, t_end)
    await load.stop()
    await client.close()
    await http.aclose()
    baseline = load.max_latency_ms(t0, t_fault)
    during = load.max_latency_ms(t_fault, t_end)
    return load, baseline, during, sink


async def test_redis_stopped_and_restarted_with_aof(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    # Two workers: the outage outlasts the heartbeat TTL (3 s), so after the restart each
    # one's peer looks dead for a moment; neither may take the other's entries.
    worker = start_worker(redis_server.url, log_dir, "w-restart", env=worker_env())
    other = start_worker(redis_server.url, log_dir, "w-restart-2", env=worker_env())
    load, baseline, during, sink = await run_fault(
        "restart", redis_server.url, log_dir, redis_server.stop, redis_server.start, hold=4.0
    )
    assert sink.counters.spooled > 0 and sink.counters.replayed == sink.counters.spooled
    assert sink.counters.dropped == 0
    await check_all_stored("Redis stopped 4 s and restarted (AOF)", load, log_dir, baseline, during)
    assert worker.poll() is None and other.poll() is None, "workers must survive a restart"
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
    assert sink is not None and isinstance(sink.sink, SpoolingSink)
    process = psutil.Process(os.getpid())
    load = Load(client, "mem", loops=8, pause=0.002, pad=1000).start()
    t0 = time.perf_counter()
    await asyncio.sleep(1.0)
    await asyncio.to_thread(redis_server.stop)
    t_fault = time.perf_counter()
    max_buffered = 0
    samples: list[tuple[int, int]] = []  # (RSS, records spooled so far)
    # Sustained load into a dead Redis until enough records went to the spool for their size
    # to dwarf allocator noise: at least 8 s, longer on a machine too loaded to send them.
    outage_ends = time.perf_counter() + 60
    while len(samples) < 40 or sink.counters.spooled < 8000:
        assert time.perf_counter() < outage_ends, f"only {sink.counters.spooled} spooled in 60 s"
        await asyncio.sleep(0.2)
        max_buffered = max(max_buffered, sink.buffered)
        samples.append((process.memory_info().rss, sink.counters.spooled))
    sent_during = len(load.sent)
    await asyncio.to_thread(redis_server.start)
    await asyncio.sleep(1.0)
    t_end = time.perf_counter()
    load.fault_window = (t_fault, t_end)
    # The app keeps running: its probe finds Redis back (backoff at most 5 s) and replays.
    await until(lambda: sink.counters.replayed == sink.counters.spooled, 30, "spool replayed")
    await load.stop()
    await client.close()
    await http.aclose()
    # Flat, not growing with the traffic: compare the second half of the outage to the first
    # (the first seconds include the allocator reaching its working set).
    rss_mid, spooled_mid = samples[len(samples) // 2]
    rss_max = max(rss for rss, _ in samples[len(samples) // 2 :])
    spooled_mb = (samples[-1][1] - spooled_mid) * 1.7 / 1024  # ~1.7 KB per record
    growth_mb = (rss_max - rss_mid) / 2**20
    print(
        f"\nmemory while Redis was down: {sent_during} records sent, max buffered "
        f"{max_buffered}, spooled {sink.counters.spooled}; second half: ~{spooled_mb:.0f} MB "
        f"of records spooled, RSS growth {growth_mb:.1f} MB"
    )
    assert sink.counters.dropped == 0
    assert max_buffered < 10_000  # well under max_buffer (50 000): the spool keeps up
    assert growth_mb < 30  # allocator noise, not the traffic (which is several times that)
    await check_all_stored(
        "Redis down 8 s or more, sustained load (memory bound)",
        load,
        log_dir,
        load.max_latency_ms(t0, t_fault),
        load.max_latency_ms(t_fault, t_end),
        timeout=90,
    )


_KILLED_APP = """
import asyncio, os, signal, sys
import orjson
import redis.asyncio as aioredis
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware._sinks._destination import redis_shipper
from vllm_middleware._sinks._shipping import ShippingSettings

async def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5)
    settings = ShippingSettings(redis_timeout=0.5, durable=True)
    sink = redis_shipper(client, keys=StreamKeys(), shipping=settings)
    for seq in range(count):
        data = orjson.dumps({"request_id": f"k{seq}", "metadata": {"tag": "app-kill", "seq": seq}})
        sink.submit(RecordEntry("2026-01-02", "app-kill", False, data))
        if seq % 100 == 99:
            assert await sink.wait_durable(10)
    print(sink.counters.spooled, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(): the spool is orphaned as it is

asyncio.run(main())
"""


async def test_killed_app_spool_is_adopted_and_replayed(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """An app spools while Redis is down and is SIGKILLed; another process replays its spool."""
    log_dir = tmp_path / "logs"
    await asyncio.to_thread(redis_server.stop)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_APP, redis_server.url, "2000", stdout=PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == -9 and int(out) == 2000  # all durable in the spool, then killed
    await asyncio.to_thread(redis_server.start)
    start_worker(redis_server.url, log_dir, "w-adopt", env=worker_env())
    http = mock_http()
    client = VLLMMiddleware(http_client=http, redis_url=redis_server.url, host="app-2")
    await client.chat_completion([{"role": "user", "content": "hi"}], model="m")
    sink = client._sink
    assert sink is not None and isinstance(sink.sink, SpoolingSink)
    await until(lambda: sink.counters.replayed == 2000, 30, "orphaned spool replayed")
    spool = sink.sink.spool
    assert spool is not None and spool.adopted_segments >= 1
    await client.close()
    await http.aclose()
    await until(lambda: len(stored(log_dir, "app-kill")) == 2000, 60, "adopted records stored")
    found = stored(log_dir, "app-kill")
    report("app SIGKILLed with a spool (adopted)", 2000, found, baseline_ms=0, fault_ms=0)
    assert max(found.values()) == 1


async def test_stream_fills_redis_to_maxmemory_while_workers_are_down(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """The lag itself fills Redis (`noeviction`): apps spool, and a worker started then must
    still be able to drain (its bookkeeping writes fall back to allow-oom scripts)."""
    server = RedisServerProcess(tmp_dir=tmp_path / "full", appendonly=True, maxmemory="16mb")
    server.start()
    try:
        log_dir = tmp_path / "logs"
        http = mock_http()
        client = VLLMMiddleware(http_client=http, redis_url=server.url, host="app-full")
        sink = client._sink
        assert sink is not None and isinstance(sink.sink, SpoolingSink)
        load = Load(client, "full", loops=8, pause=0.002, pad=3000).start()
        t0 = time.perf_counter()
        await until(lambda: sink.counters.spooled > 0, 30, "Redis full, apps spooling")
        t_fault = time.perf_counter()
        # Top it up with small entries until even a small write is refused: a stuck state.
        admin = redis.Redis.from_url(server.url)
        topped = 0

        def top_up() -> None:
            nonlocal topped
            while True:
                meta = {"tag": "fill", "seq": topped}
                rec = orjson.dumps({"request_id": f"f{topped}", "metadata": meta})
                fields = {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": rec}
                try:
                    admin.xadd(KEYS.stream, fields)
                except redis.exceptions.OutOfMemoryError:
                    return
                topped += 1

        await asyncio.to_thread(top_up)
        # Pin the limit far below what the stream holds: no write slips through as buffers
        # come and go, until the operator raises it again below.
        admin.config_set("maxmemory", "1mb")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.hset("probe", "f", "v")
        worker = start_worker(server.url, log_dir, "w-full", env=worker_env())
        # The worker drains the stream at OOM: its writes fall back to allow-oom scripts.
        await until(lambda: admin.xlen(KEYS.stream) == 0, 30, "stream drained at OOM")
        assert int(admin.info("memory")["used_memory"]) > 1024 * 1024  # still at OOM
        admin.config_set("maxmemory", "64mb")
        await asyncio.sleep(1.0)
        t_end = time.perf_counter()
        load.fault_window = (t_fault, t_end)
        await load.stop()
        await until(lambda: sink.counters.replayed == sink.counters.spooled, 60, "replayed")
        await client.close()
        await http.aclose()
        assert sink.counters.dropped == 0
        await check_all_stored(
            "stream filled Redis to maxmemory (workers down)",
            load,
            log_dir,
            load.max_latency_ms(t0, t_fault),
            load.max_latency_ms(t_fault, t_end),
        )
        await until(lambda: len(stored(log_dir, "fill")) == topped, 30, "top-up stored")
        # Redis may already be too full for even one top-up entry: then there is none to count.
        assert all(count == 1 for count in stored(log_dir, "fill").values())
        assert worker.poll() is None
        admin.close()
    finally:
        server.cleanup()
