"""The worker against bad bookkeeping: a damaged stats hash, forged or implausible intents, a
log directory it cannot write (issue 11, items 1-3)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from vllm_middleware import StreamKeys, get_statistics, load_logs
from vllm_middleware._cli import main as cli_main
from vllm_middleware.testing import RedisServerProcess
from vllm_middleware_worker import StreamConsumer, open_consumer_redis

from .conftest import WorkerFactory, drain, wait_for
from .test_worker import config, fields

KEYS = StreamKeys()


async def _until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def test_a_damaged_stats_hash_acknowledges_nothing_and_is_reported(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """`HSET stats requests abc`: the ack must not half-apply (XACK/XDEL done, counters failed),
    which let a recovering worker cut an already-acknowledged batch: a record lost."""
    await redis.hset(KEYS.stats, "requests", "abc")
    for i in range(10):
        await redis.xadd(KEYS.stream, fields(i))
    cfg = config(redis_server, tmp_path, "w1")
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    task = asyncio.create_task(consumer.run())
    try:
        await _until(lambda: consumer.status.errors_by_kind["ack"] >= 2, 20, "ack refused twice")
        # Nothing acknowledged: every entry still in the stream and pending, the intent kept.
        assert await redis.xlen(KEYS.stream) == 10
        assert (await redis.xpending(KEYS.stream, KEYS.group))["pending"] == 10
        assert await redis.hexists(KEYS.inflight, "w1")
        # Reported: the worker's heartbeat, its status, the statistics.
        assert consumer.ack_error is not None and "requests" in consumer.ack_error
        beat = orjson.loads(await redis.get(KEYS.heartbeat("w1")))
        assert beat["state"] == "ack_error" and "requests" in beat["ack_error"]
        stats = get_statistics(redis_server.url)
        assert stats["damaged_fields"] == {"requests": "abc"}
        assert stats["worker_ack_errors"] >= 2 and stats["total_requests"] == 0
        # Backing off: not a tight loop (0.1, 0.2, 0.4 ... s between attempts).
        assert consumer.status.errors_by_kind["ack"] < 10
        # It stops when told, although the batch is not acknowledged.
        consumer.stop()
        await asyncio.wait_for(asyncio.shield(task), 10)
    finally:
        task.cancel()
        await client.aclose()
    # A person repairs the hash; another worker recovers the stopped one's batch: every record
    # exactly once.
    await redis.hdel(KEYS.stats, "requests")
    await drain(config(redis_server, tmp_path, "w2"))
    assert sorted(r.request_id for r in load_logs(tmp_path)) == sorted(f"r{i}" for i in range(10))
    assert get_statistics(redis_server.url)["total_requests"] == 10


async def test_dead_letters_with_a_damaged_stats_hash_are_not_half_applied(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """The dead-letter path (formerly MULTI/EXEC, which goes on past a failed command)."""
    await redis.hset(KEYS.stats, "dead_letters", "1.5")
    await redis.xadd(KEYS.stream, fields(1))
    await redis.xadd(KEYS.stream, {b"junk": b"1"})
    cfg = config(redis_server, tmp_path, "w1")
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    task = asyncio.create_task(consumer.run())
    try:
        await _until(lambda: consumer.status.errors_by_kind["ack"] >= 1, 20, "ack refused")
        assert await redis.xlen(KEYS.dead_letter) == 0
        assert (await redis.xpending(KEYS.stream, KEYS.group))["pending"] == 2
        consumer.stop()
        await asyncio.wait_for(asyncio.shield(task), 10)
    finally:
        task.cancel()
        await client.aclose()


async def test_statistics_survive_a_damaged_stats_hash(
    redis: aioredis.Redis, redis_server: RedisServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    await redis.hset(
        KEYS.stats,
        mapping={"requests": "7", "requests:host:h": "x" * 100, "requests:date:2026-01-02": "3"},
    )
    stats = get_statistics(redis_server.url)
    assert stats["total_requests"] == 7 and stats["by_date"] == {"2026-01-02": 3}
    assert stats["damaged_fields"] == {"requests:host:h": "x" * 64}
    assert cli_main(["stats", "--redis-url", redis_server.url]) == 0
    assert "requests:host:h" in capsys.readouterr().out


def test_a_worker_that_cannot_write_refuses_to_start(tmp_path: Path) -> None:
    """`--log-dir ./afile/sub`: formerly started, warned once and retried forever."""
    (tmp_path / "afile").write_text("not a directory")
    args = ["--redis-url", "redis://127.0.0.1:1/0", "--log-dir", str(tmp_path / "afile" / "sub")]
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_middleware_worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "afile" in lines[0] and "cannot write" in lines[0], proc.stderr


def test_a_worker_whose_writes_fail_still_stops_when_told(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """The partition directory cannot be made (a regular file holds its name): every write
    fails, and so does every undo. SIGTERM formerly waited out the retry loops (10 min)."""
    import redis as sync_redis

    log_dir = tmp_path / "logs"
    client = sync_redis.Redis.from_url(redis_server.url)
    proc = start_worker(redis_server.url, log_dir, "stuck")
    client.xadd(KEYS.stream, fields(0, date="2026-01-02"))
    wait_for(lambda: get_statistics(redis_server.url)["total_requests"] == 1)
    (log_dir / "date=2026-01-03").write_text("in the way")
    client.xadd(KEYS.stream, fields(1, date="2026-01-03"))
    wait_for(lambda: get_statistics(redis_server.url)["worker_write_errors"] >= 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    # Nothing lost: the unwritten record is still pending, and written once the way is clear.
    assert get_statistics(redis_server.url)["pending"] == 1
    (log_dir / "date=2026-01-03").unlink()
    start_worker(redis_server.url, log_dir, "stuck")
    wait_for(lambda: get_statistics(redis_server.url)["total_requests"] == 2)
    assert sorted(r.request_id for r in load_logs(log_dir)) == ["r0", "r1"]
    client.close()
