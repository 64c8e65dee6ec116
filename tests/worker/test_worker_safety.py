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
from vllm_middleware import get_statistics, load_logs
from vllm_middleware._cli import main as cli_main
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import StreamConsumer, open_consumer_redis

from ..conftest import WorkerFactory, drain, wait_for
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
    # The CLI refuses a stream nobody has used: make it as a worker would.
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
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


async def _durable_file(
    redis: aioredis.Redis, cfg_dir: Path, url_server: RedisServerProcess
) -> Path:
    """31 records written and acknowledged by worker "w1": its one file."""
    for i in range(31):
        await redis.xadd(KEYS.stream, fields(i))
    await drain(config(url_server, cfg_dir, "w1"))
    (path,) = cfg_dir.rglob("*.jsonl")
    assert len(path.read_bytes().splitlines()) == 31
    return path


async def _pending_for(redis: aioredis.Redis, consumer: str, count: int = 1) -> list[str]:
    first = await redis.xadd(KEYS.stream, fields(900))
    for i in range(1, count):
        await redis.xadd(KEYS.stream, fields(900 + i))
    read = await redis.xreadgroup(KEYS.group, consumer, {KEYS.stream: ">"}, count=count)
    ids = [entry_id.decode() for entry_id, _ in read[0][1]]
    assert ids[0] == first.decode()
    return ids


@pytest.mark.parametrize("version", [1, 2])
async def test_a_forged_intent_cuts_nothing_and_is_reported(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path, version: int
) -> None:
    """`HSET inflight ghost {"parts": [[<w1's file>, 0]]}` plus one pending entry for a
    made-up consumer formerly made a live worker cut 31 durable records to 0 bytes."""
    path = await _durable_file(redis, tmp_path, redis_server)
    relative = path.relative_to(tmp_path).as_posix()
    ids = await _pending_for(redis, "ghost")
    size = path.stat().st_size
    intent: dict[str, object] = {"parts": [[relative, 0]]}
    if version == 2:
        intent = {"v": 2, "ids": [ids[0], ids[0]], "parts": [[relative, 0, size]]}
    await redis.hset(KEYS.inflight, "ghost", orjson.dumps(intent))
    live = await _run_recovery(redis_server, tmp_path, "w2")
    assert path.stat().st_size == size and live.status.refused_intents == 1
    # Left for a person: the intent, the pending entry; shown by `vllm-mw stats`.
    assert await redis.hexists(KEYS.inflight, "ghost")
    (pending,) = await redis.xpending_range(KEYS.stream, KEYS.group, "-", "+", 10)
    assert pending["consumer"] == b"ghost"
    refused = get_statistics(redis_server.url)["refused_intents"]
    assert list(refused) == ["ghost"] and "reason" in orjson.loads(refused["ghost"])
    # Once a person removes the intent, the entry is recovered and the record lost nothing.
    await redis.hdel(KEYS.inflight, "ghost")
    await _run_recovery(redis_server, tmp_path, "w2")
    assert len(load_logs(tmp_path)) == 32
    assert get_statistics(redis_server.url)["refused_intents"] == {}


async def _run_recovery(server: RedisServerProcess, log_dir: Path, name: str) -> StreamConsumer:
    cfg = config(server, log_dir, name)
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    try:
        await consumer.recovery.recover_dead_consumers()
    finally:
        await client.aclose()
    return consumer


async def _dead_consumer_batch(
    redis: aioredis.Redis, server: RedisServerProcess, log_dir: Path, count: int = 5
) -> tuple[StreamConsumer, Path, bytes]:
    """Consumer "dead" wrote `count` pending entries durably, recorded its intent and died."""
    ids = await _pending_for(redis, "dead", count)
    dead = StreamConsumer(redis, config(server, log_dir, "dead"))
    entries = await redis.xrange(KEYS.stream, ids[0], ids[-1])
    batch = [RecordEntry("2026-01-02", "h", False, f[b"rec"]) for _, f in entries]
    plan = dead.writer.plan(batch)
    intent = dead._intent(plan, [i.encode() for i in ids])
    await redis.hset(KEYS.inflight, "dead", intent)
    dead.writer.write(plan)
    dead.writer.close()
    (path,) = (p for p in log_dir.rglob("dead-*.jsonl"))
    return dead, path, intent


async def test_an_intent_whose_entries_were_acknowledged_is_refused(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    _, path, intent = await _dead_consumer_batch(redis, redis_server, tmp_path)
    # Its entries were acknowledged (the intent is stale), and one more is pending.
    ids = orjson.loads(intent)["ids"]
    await redis.xack(KEYS.stream, KEYS.group, *ids)
    await _pending_for(redis, "dead")
    size = path.stat().st_size
    live = await _run_recovery(redis_server, tmp_path, "w2")
    assert path.stat().st_size == size and live.status.refused_intents == 1


async def test_a_file_grown_past_the_intent_is_not_cut(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    _, path, _ = await _dead_consumer_batch(redis, redis_server, tmp_path)
    with open(path, "ab") as handle:  # bytes no intent of this consumer accounts for
        handle.write(b'{"request_id": "later"}\n')
    size = path.stat().st_size
    live = await _run_recovery(redis_server, tmp_path, "w2")
    assert path.stat().st_size == size and live.status.refused_intents == 1


async def test_an_intent_through_a_symlink_out_of_log_dir_is_refused(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """The consumer's own file name, a valid intent, but its host directory is a symlink to a
    directory outside `log_dir`: nothing outside is cut."""
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    log_dir = tmp_path / "logs"
    _, path, _ = await _dead_consumer_batch(redis, redis_server, log_dir)
    outside = tmp_path / "outside"
    path.parent.rename(outside)
    path.parent.symlink_to(outside, target_is_directory=True)
    victim = outside / path.name
    size = victim.stat().st_size
    live = await _run_recovery(redis_server, log_dir, "w2")
    assert victim.stat().st_size == size and live.status.refused_intents == 1


async def test_a_real_intent_is_still_undone(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """The checks refuse no genuine intent: the dead consumer's batch is cut and rewritten."""
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    _, path, _ = await _dead_consumer_batch(redis, redis_server, tmp_path)
    await drain(config(redis_server, tmp_path, "w2"))
    assert path.stat().st_size == 0
    assert len(load_logs(tmp_path)) == 5
    assert await redis.hgetall(KEYS.inflight) == {}
