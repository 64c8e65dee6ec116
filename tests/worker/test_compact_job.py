"""The worker's compaction and compression crons: off by default, each day done by one worker,
under a Redis lock that expires when its holder dies and is renewed while it works."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis as redis_sync
import redis.asyncio as aioredis
from vllm_middleware import load_logs
from vllm_middleware.storage import StreamKeys
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import WorkerConfig, make_worker_settings
from vllm_middleware_worker._compact_job import DayLock, run_compaction, run_compression

from ..client.test_compress import DAYS, ids, make_tree, names
from ..conftest import WorkerFactory, wait_for

pytest.importorskip("duckdb")


def configs(url: str, logs: Path, n: int, **settings: bool) -> list[WorkerConfig]:
    return [
        WorkerConfig(redis_url=url, log_dir=str(logs), consumer=f"w{i}", **settings)
        for i in range(n)
    ]


async def test_off_by_default(tmp_path: Path, redis_server: RedisServerProcess) -> None:
    make_tree(tmp_path)
    [config] = configs(redis_server.url, tmp_path, 1)
    assert not config.compact and not config.compress
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert "skipped" in await run_compaction(client, config)
        assert "skipped" in await run_compression(client, config)
    finally:
        await client.aclose()
    assert names(tmp_path, "*.parquet") == [] and names(tmp_path, "*.gz") == []
    jobs = [job.name for job in make_worker_settings(config).cron_jobs]
    assert not any("compact" in name or "compress" in name for name in jobs)
    on = WorkerConfig(redis_url=redis_server.url, compact=True, compress=True)
    jobs = [job.name for job in make_worker_settings(on).cron_jobs]
    assert any("compact_job" in name for name in jobs)
    assert any("compress_job" in name for name in jobs)


@pytest.mark.parametrize("job", ["compact", "compress"])
async def test_each_day_is_done_by_one_worker_of_the_fleet(
    tmp_path: Path, redis_server: RedisServerProcess, job: str
) -> None:
    make_tree(tmp_path)
    before = ids(tmp_path)
    fleet = configs(redis_server.url, tmp_path, 3, **{job: True})
    clients = [aioredis.Redis.from_url(redis_server.url) for _ in fleet]
    run = run_compaction if job == "compact" else run_compression
    try:
        results = await asyncio.gather(
            *(run(c, cfg) for c, cfg in zip(clients, fleet, strict=True))
        )
        stats = await clients[0].hgetall(StreamKeys().stats)
        assert await clients[0].keys(f"vllm:logs:{job}:lock:*") == []  # all released
    finally:
        for client in clients:
            await client.aclose()
    if job == "compact":
        done = sorted(p for r in results for p in r["compacted"])
        assert len(done) == len(set(done)) == 4  # 2 days x 2 hosts, each once
        assert int(stats[b"compaction_records"]) == len(before)
        assert names(tmp_path, "*.jsonl") == [] and len(names(tmp_path, "*.parquet")) == 4
    else:
        assert sum(r["compressed"] for r in results) == int(stats[b"compression_files"]) > 0
        assert names(tmp_path, "*.jsonl") == []
    assert ids(tmp_path) == before


async def test_a_day_locked_by_a_dead_worker_waits_for_the_lock_to_expire(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    make_tree(tmp_path)
    [config] = configs(redis_server.url, tmp_path, 1, compact=True)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(f"vllm:logs:compact:lock:{DAYS[0]}", b"dead-worker", px=500)
        first = await run_compaction(client, config)
        assert first["locked_elsewhere"] == [DAYS[0]]
        assert all(DAYS[1] in label for label in first["compacted"])
        await asyncio.sleep(0.6)
        second = await run_compaction(client, config)
        assert all(DAYS[0] in label for label in second["compacted"]) and second["compacted"]
    finally:
        await client.aclose()
    assert len(load_logs(tmp_path)) == 2 * 120


async def test_the_lock_is_renewed_while_held_and_released_only_by_its_holder(
    redis_server: RedisServerProcess,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        lock = DayLock(client, "lock:test", "w1", ttl_ms=300)
        async with lock.held() as mine:
            assert mine
            await asyncio.sleep(1.0)  # over three times the TTL
            assert await client.get("lock:test") == lock.token
            async with DayLock(client, "lock:test", "w2", ttl_ms=300).held() as theirs:
                assert not theirs
            assert await client.get("lock:test") == lock.token  # not released by w2
        assert await client.get("lock:test") is None
    finally:
        await client.aclose()


def test_two_worker_processes_compress_and_compact_each_day_once(
    tmp_path: Path, redis_server: RedisServerProcess, start_worker: WorkerFactory
) -> None:
    logs = tmp_path / "logs"
    make_tree(logs)
    before = ids(logs)
    env = {"VLLM_MW_COMPACT": "1", "VLLM_MW_COMPRESS": "1"}
    for name in ("w1", "w2"):
        start_worker(redis_server.url, logs, name, env=env)
    stats_key = StreamKeys().stats

    def compacted() -> bool:
        stats = redis_sync.Redis.from_url(redis_server.url).hgetall(stats_key)
        return int(stats.get(b"compaction_partitions", 0)) >= 4

    wait_for(compacted, timeout=60)
    stats = redis_sync.Redis.from_url(redis_server.url).hgetall(stats_key)
    assert int(stats[b"compaction_partitions"]) == 4  # 2 days x 2 hosts, once each
    assert int(stats[b"compaction_records"]) == len(before)
    assert names(logs, "*.jsonl") == [] and len(names(logs, "*.parquet")) == 4
    assert ids(logs) == before


@pytest.mark.parametrize("job", ["compact", "compress"])
async def test_waits_while_a_dead_workers_batch_awaits_recovery(
    tmp_path: Path, redis_server: RedisServerProcess, job: str
) -> None:
    make_tree(tmp_path)
    [config] = configs(redis_server.url, tmp_path, 1, **{job: True})
    run = run_compaction if job == "compact" else run_compression
    keys = StreamKeys()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        # A live worker's intent is its own business; a dead one's must be cut first.
        await client.hset(keys.inflight, "alive\x00next", b"{}")
        await client.set(keys.heartbeat("alive"), b"{}")
        await client.hset(keys.inflight, "dead", b"{}")
        skipped = await run(client, config)
        assert "dead worker 'dead'" in skipped["skipped"]
        assert names(tmp_path, "*.parquet") == [] and names(tmp_path, "*.gz") == []
        await client.hdel(keys.inflight, "dead")  # recovered
        ran = await run(client, config)
        assert "skipped" not in ran
    finally:
        await client.aclose()
    assert names(tmp_path, "*.jsonl") == []
