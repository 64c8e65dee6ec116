"""The worker's consumer: dead letters, recovery of dead consumers, arq integration, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from vllm_middleware import get_statistics, load_logs
from vllm_middleware._keys import FIELD_DATE, FIELD_ERROR, FIELD_HOST, FIELD_RECORD
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import (
    StreamConsumer,
    WorkerConfig,
    make_worker_settings,
    open_consumer_redis,
)
from vllm_middleware_worker._ack import Acknowledger

from ..conftest import WorkerFactory, drain, wait_for

KEYS = StreamKeys()


def fields(
    i: int, *, date: str = "2026-01-02", host: str = "h", **extra: object
) -> dict[bytes, bytes]:
    record = {"request_id": f"r{i}", "error": None, **extra}
    return {
        FIELD_DATE: date.encode(),
        FIELD_HOST: host.encode(),
        FIELD_ERROR: b"0",
        FIELD_RECORD: orjson.dumps(record),
    }


def config(
    redis_server: RedisServerProcess, log_dir: Path, name: str, **kw: object
) -> WorkerConfig:
    return WorkerConfig(
        redis_url=redis_server.url, log_dir=str(log_dir), consumer=name, block_ms=100, **kw
    )


async def test_bad_entries_go_to_the_dead_letter_stream(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    await redis.xadd(KEYS.stream, fields(1))
    await redis.xadd(KEYS.stream, {b"junk": b"1"})
    await redis.xadd(KEYS.stream, fields(2, date="../../etc"))
    await redis.xadd(KEYS.stream, {**fields(3), FIELD_RECORD: b"{not json"})
    await redis.xadd(KEYS.stream, {**fields(4), FIELD_RECORD: b"[1, 2]"})
    await redis.xadd(KEYS.stream, fields(5, host="a\x00b"))
    await redis.xadd(KEYS.stream, fields(6, pad="x" * 5000))
    # A record with a raw newline inside is re-encoded onto one line, not split.
    await redis.xadd(KEYS.stream, {**fields(7), FIELD_RECORD: b'{"request_id":\n"r7"}'})
    consumer = await drain(config(redis_server, tmp_path, "w", max_record_bytes=4000))
    assert sorted(r.request_id for r in load_logs(tmp_path)) == ["r1", "r7"]
    dead = await redis.xrange(KEYS.dead_letter)
    reasons = sorted(entry[b"reason"].decode() for _, entry in dead)
    assert len(dead) == 6 and consumer.status.dead_letters == 6
    assert any("missing record" in r for r in reasons)
    assert any("invalid date" in r for r in reasons)
    assert any("not valid JSON" in r for r in reasons)
    assert any("not a JSON object" in r for r in reasons)
    assert any("invalid host" in r for r in reasons)
    assert any("exceeds max_record_bytes" in r for r in reasons)
    # Dead letters keep the whole entry, to be inspected or replayed.
    assert any(entry.get(FIELD_RECORD, b"").startswith(b'{"request_id":"r6"') for _, entry in dead)
    stats = get_statistics(redis_server.url)
    assert stats["dead_letters"] == 6 and stats["total_requests"] == 2
    assert stats["stream_length"] == 0 and stats["pending"] == 0


async def test_dead_consumer_is_recovered_without_duplicates(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """A worker died after writing a batch and before acknowledging it."""
    for i in range(10):
        await redis.xadd(KEYS.stream, fields(i))
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0")
    # The dead worker read all ten, wrote the first batch (r0..r5) durably...
    entries = (await redis.xreadgroup(KEYS.group, "dead", {KEYS.stream: ">"}))[0][1]
    assert len(entries) == 10
    dead_cfg = config(redis_server, tmp_path, "dead")
    consumer = StreamConsumer(redis, dead_cfg)
    batch = [
        RecordEntry(f[FIELD_DATE].decode(), f[FIELD_HOST].decode(), False, f[FIELD_RECORD])
        for _, f in entries[:6]
    ]
    plan = consumer.writer.plan(batch)
    ids = [entry_id for entry_id, _ in entries]
    await redis.hset(KEYS.inflight, "dead", consumer._intent(plan, ids[:6]))
    consumer.writer.write(plan)
    # ... plus a torn half line of the next batch (its own intent), then died without
    # acknowledging anything.
    later = consumer.writer.plan(
        [
            RecordEntry(f[FIELD_DATE].decode(), f[FIELD_HOST].decode(), False, f[FIELD_RECORD])
            for _, f in entries[6:]
        ]
    )
    await redis.hset(KEYS.inflight, "dead\x00next", consumer._intent(later, ids[6:]))
    (path,) = tmp_path.rglob("*.jsonl")
    with open(path, "ab") as handle:
        handle.write(b'{"request_id": "r6", "tor')
    consumer.writer.close()
    # No heartbeat key exists for "dead": a live worker recovers its entries.
    live = await drain(config(redis_server, tmp_path, "live"))
    ids = sorted(r.request_id for r in load_logs(tmp_path))
    assert ids == sorted(f"r{i}" for i in range(10))
    assert path.read_bytes() == b""  # the unacknowledged bytes were removed
    assert live.status.recovered_consumers == 1
    consumers = await redis.xinfo_consumers(KEYS.stream, KEYS.group)
    assert [c["name"] for c in consumers] == [b"live"]
    assert await redis.hgetall(KEYS.inflight) == {}
    assert get_statistics(redis_server.url)["total_requests"] == 10


async def test_live_consumer_entries_are_not_stolen(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    await redis.xadd(KEYS.stream, fields(1))
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0")
    await redis.xreadgroup(KEYS.group, "busy", {KEYS.stream: ">"})
    await redis.set(KEYS.heartbeat("busy"), b"1", px=30_000)  # alive, just slow
    cfg = config(redis_server, tmp_path, "other")
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    await consumer.recovery.recover_dead_consumers()
    await client.aclose()
    pending = await redis.xpending(KEYS.stream, KEYS.group)
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"busy"


async def test_entries_delivered_too_often_are_dead_lettered(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    entry_id = await redis.xadd(KEYS.stream, fields(1))
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0")
    await redis.xreadgroup(KEYS.group, "crashy", {KEYS.stream: ">"})
    for _ in range(4):  # each claim counts as one more delivery to a worker that then died
        await redis.xclaim(KEYS.stream, KEYS.group, "crashy", 0, [entry_id])
    (pending,) = await redis.xpending_range(KEYS.stream, KEYS.group, "-", "+", 10)
    assert pending["times_delivered"] == 5
    live = await drain(config(redis_server, tmp_path, "live", max_deliveries=5))
    assert live.status.dead_letters == 1
    (dead,) = await redis.xrange(KEYS.dead_letter)
    assert b"delivered" in dead[1][b"reason"]
    assert load_logs(tmp_path) == []


async def test_arq_worker_runs_the_consumer_and_the_stats_cron(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    from arq.worker import Worker

    for i in range(50):
        await redis.xadd(KEYS.stream, fields(i))
    cfg = config(redis_server, tmp_path, "arq-w", stats_interval_s=1)
    settings = make_worker_settings(cfg)
    worker = Worker(
        functions=settings.functions,
        cron_jobs=settings.cron_jobs,
        redis_settings=settings.redis_settings,
        on_startup=settings.on_startup,
        on_shutdown=settings.on_shutdown,
        queue_name=settings.queue_name,
        handle_signals=False,
        poll_delay=0.1,
    )
    task = asyncio.create_task(worker.async_run())
    try:
        for _ in range(200):
            stats = get_statistics(redis_server.url)
            if stats["total_requests"] == 50 and stats["log_files_count"] == 1:
                break
            await asyncio.sleep(0.1)
        assert stats["total_requests"] == 50
        assert stats["log_files_count"] == 1 and stats["log_directory"] == str(tmp_path)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await worker.close()
    assert len(load_logs(tmp_path)) == 50


def test_sigterm_finishes_the_batch_and_exits_cleanly(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    proc = start_worker(redis_server.url, tmp_path / "logs", "term")
    pipe = client.pipeline()
    for i in range(20_000):
        pipe.xadd(KEYS.stream, fields(i, pad="y" * 200))
    pipe.execute()
    wait_for(lambda: get_statistics(redis_server.url)["total_requests"] > 0, timeout=30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    done = get_statistics(redis_server.url)["total_requests"]
    records = load_logs(tmp_path / "logs")
    assert len(records) == done  # everything written was acknowledged, nothing half-done
    assert get_statistics(redis_server.url)["pending"] == 0
    # A new worker takes the rest; nothing is lost or written twice.
    start_worker(redis_server.url, tmp_path / "logs", "term2")
    wait_for(lambda: get_statistics(redis_server.url)["total_requests"] == 20_000, timeout=60)
    ids = [r.request_id for r in load_logs(tmp_path / "logs")]
    assert len(ids) == len(set(ids)) == 20_000
    client.close()


def test_worker_reports_bad_configuration_clearly(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    env = dict(os.environ, VLLM_MW_BATCH_SIZE="many")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_middleware_worker",
            "--burst",
            "--redis-url",
            redis_server.url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "VLLM_MW_BATCH_SIZE='many'" in result.stderr
    assert "Traceback" not in result.stderr


async def test_pending_entries_rewritten_after_a_restart_are_not_undone(
    redis: aioredis.Redis,
    redis_server: RedisServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Entries delivered to a consumer that died before writing them are re-read and written
    when it comes back, over several batches, each acknowledged while the next is read. The
    undo of a previous life's batch must run once, not again while such an ack is in flight
    (it would cut the rewritten batch, which the ack then removes from the stream: lost)."""
    for i in range(30):
        await redis.xadd(KEYS.stream, fields(i))
    await redis.xgroup_create(KEYS.stream, KEYS.group, id="0")
    # A previous life read them all (pending) and died before writing anything.
    await redis.xreadgroup(KEYS.group, "w1", {KEYS.stream: ">"}, count=100)
    send = Acknowledger.send

    async def slow_send(self: Acknowledger, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.2)  # the ack is still in flight when the loop comes around
        await send(self, *args, **kwargs)

    monkeypatch.setattr(Acknowledger, "send", slow_send)
    consumer = await drain(config(redis_server, tmp_path / "logs", "w1", batch_size=10))
    ids = sorted(r["request_id"] for r in load_logs(tmp_path / "logs"))
    assert ids == sorted(f"r{i}" for i in range(30))
    assert consumer.status.records == 30 and await redis.xlen(KEYS.stream) == 0


async def test_after_undoing_its_own_batch_the_writer_plans_from_the_real_file_size(
    redis: aioredis.Redis,
    redis_server: RedisServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis error mid-run makes the consumer undo its own unacknowledged batch (here: an
    intent left as a lost ack would leave it). The cut happens behind the writer's back, so the
    writer must not go on planning batches, and recording intents, at the old file size."""
    cfg = config(redis_server, tmp_path / "logs", "w1", batch_size=10)
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    planned: list[tuple[int, int]] = []  # (offset in the plan, real size of the file)
    plan = consumer.writer.plan

    def spy(entries: Any) -> Any:
        result = plan(entries)
        for part in result.parts:
            real = part.path.stat().st_size if part.path.exists() else 0
            planned.append((part.offset, real))
        return result

    monkeypatch.setattr(consumer.writer, "plan", spy)
    task = asyncio.create_task(consumer.run())
    try:
        for i in range(10):
            await redis.xadd(KEYS.stream, fields(i))
        await asyncio.sleep(0.5)
        (path,) = (tmp_path / "logs").rglob("*.jsonl")
        size = path.stat().st_size
        # A batch whose ack did not land: its intent names the last 3 lines of the file, and
        # entries pending for the consumer (delivered to it without its loop seeing them).
        cut = size - sum(len(line) + 1 for line in path.read_bytes().splitlines()[-3:])
        relative = path.relative_to(tmp_path / "logs").as_posix()
        pipe = redis.pipeline(transaction=True)
        for i in range(100, 103):
            pipe.xadd(KEYS.stream, fields(i))
        pipe.xreadgroup(KEYS.group, "w1", {KEYS.stream: ">"}, count=3)
        *_, read = await pipe.execute()
        pending = [entry_id.decode() for entry_id, _ in read[0][1]]
        intent = {"v": 2, "ids": [pending[0], pending[-1]], "parts": [[relative, cut, size - cut]]}
        await redis.hset(KEYS.inflight, "w1", orjson.dumps(intent))
        redis_server.stop()  # the consumer sees an error: it undoes its intent when back
        await asyncio.sleep(0.5)
        redis_server.start()
        await asyncio.sleep(1.0)
        for i in range(10, 20):
            await redis.xadd(KEYS.stream, fields(i))
        await asyncio.sleep(1.0)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
    assert planned and all(offset == real for offset, real in planned), planned
