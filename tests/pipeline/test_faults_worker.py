"""Fault injection on the worker side, with the real pipeline (clients in-test, workers and
redis-server in subprocesses): SIGKILL at random moments, a disk that fills up or turns
read-only, entries to dead-letter among live traffic."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import redis
from vllm_middleware import VLLMMiddleware, get_statistics
from vllm_middleware.storage import StreamKeys
from vllm_middleware_testing import RedisServerProcess

from ..conftest import WorkerFactory, drain
from .faults_support import Load, check_all_stored, mock_http, stored, until, worker_env

pytestmark = pytest.mark.slow

KEYS = StreamKeys()


async def test_workers_sigkilled_at_random_moments_under_load(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    # Small files: rotation happens inside batches too, so kills land mid-rotation as well.
    env = worker_env(VLLM_MW_HEARTBEAT_TTL_S="2", VLLM_MW_MAX_LOG_SIZE_MB="0.25")
    live = {f"w{i}": start_worker(redis_server.url, log_dir, f"w{i}", env=env) for i in range(3)}
    http = mock_http()
    client = VLLMMiddleware(http_client=http, redis_url=redis_server.url, host="app-kill")
    load = Load(client, "kill").start()
    rng = random.Random(1234)
    t0 = time.perf_counter()
    await asyncio.sleep(1.5)
    t_fault = time.perf_counter()
    kills = 0
    for round_no in range(14):
        await asyncio.sleep(rng.uniform(0.05, 1.0))
        name = rng.choice(sorted(live))
        live.pop(name).kill()  # SIGKILL: no clean-up of any kind
        kills += 1
        fresh = f"w{3 + round_no}"
        live[fresh] = start_worker(redis_server.url, log_dir, fresh, env=env)
    t_end = time.perf_counter()
    load.fault_window = (t_fault, t_end)
    await load.stop()
    await client.close()
    await http.aclose()
    await check_all_stored(
        f"{kills} workers SIGKILLed at random moments",
        load,
        log_dir,
        load.max_latency_ms(t0, t_fault),
        load.max_latency_ms(t_fault, t_end),
        timeout=90,
        settle=1.0,
    )
    stats = get_statistics(redis_server.url)
    assert stats["dead_letters"] == 0
    await until(
        lambda: get_statistics(redis_server.url)["stream_length"] == 0, 30, "stream emptied"
    )
    assert get_statistics(redis_server.url)["pending"] == 0
    for proc in live.values():
        assert proc.poll() is None


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


async def test_disk_full_then_space_freed(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(log_dir)):
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full test not run")
    worker: subprocess.Popen[bytes] | None = None
    admin = redis.Redis.from_url(redis_server.url)
    try:
        worker = start_worker(redis_server.url, log_dir, "w-disk", env=worker_env())
        http = mock_http()
        client = VLLMMiddleware(http_client=http, redis_url=redis_server.url, host="app-disk")
        load = Load(client, "disk", pad=1500).start()

        def health() -> dict[str, object]:
            raw = admin.get(KEYS.heartbeat("w-disk"))
            return orjson.loads(raw) if raw else {}

        t0 = time.perf_counter()
        await until(lambda: health().get("state") == "disk_error", 30, "disk full reported")
        t_fault = time.perf_counter()
        assert "No space left" in str(health()["disk_error"])
        assert int(admin.hget(KEYS.stats, "worker_write_errors") or 0) > 0
        await asyncio.sleep(1.0)
        assert _mount("-o", "remount,size=64m", str(log_dir))
        await until(lambda: health().get("state") == "ok", 30, "recovered after space freed")
        # (A read-only remount is refused while the worker holds files open for writing, and
        # root ignores permissions: EROFS/EACCES take the same code path as ENOSPC here.)
        await asyncio.sleep(0.5)
        t_end = time.perf_counter()
        load.fault_window = (t_fault, t_end)
        await load.stop()
        await client.close()
        await http.aclose()
        await check_all_stored(
            "disk full (3 MB tmpfs), then space freed",
            load,
            log_dir,
            load.max_latency_ms(t0, t_fault),
            load.max_latency_ms(t_fault, t_end),
            timeout=90,
            settle=1.0,
        )
        assert worker.poll() is None
    finally:
        admin.close()
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=30)
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(log_dir)], check=False)


async def test_bad_entries_among_live_traffic(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    start_worker(redis_server.url, log_dir, "w-bad-entries", env=worker_env())
    http = mock_http()
    client = VLLMMiddleware(http_client=http, redis_url=redis_server.url, host="app-bad-entries")
    load = Load(client, "bad-entries").start()
    admin = redis.Redis.from_url(redis_server.url)
    bad_entries: list[dict[bytes, bytes]] = [
        {b"junk": b"1"},
        {b"date": b"../../etc", b"host": b"h", b"err": b"0", b"rec": b"{}"},
        {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": b"{not json"},
        {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": b"[1]"},
        {b"date": b"2026-01-02", b"host": b"a\x00b", b"err": b"0", b"rec": b"{}"},
    ]
    t0 = time.perf_counter()
    await asyncio.sleep(1.0)
    t_fault = time.perf_counter()
    for i in range(40):
        await asyncio.to_thread(admin.xadd, KEYS.stream, bad_entries[i % len(bad_entries)])
        await asyncio.sleep(0.02)
    t_end = time.perf_counter()
    load.fault_window = (t_fault, t_end)
    await asyncio.sleep(0.5)
    await load.stop()
    await client.close()
    await http.aclose()
    await check_all_stored(
        "40 bad entries among traffic",
        load,
        log_dir,
        load.max_latency_ms(t0, t_fault),
        load.max_latency_ms(t_fault, t_end),
        timeout=90,
        settle=1.0,
    )
    await until(lambda: admin.xlen(KEYS.dead_letter) == 40, 30, "dead letters")
    assert get_statistics(redis_server.url)["dead_letters"] == 40
    admin.close()


async def test_read_only_disk_whose_rollback_also_fails(
    redis_server: RedisServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EROFS mid-write, and the writer's own rollback refused too (simulated in-process: a
    real read-only remount is refused while files are open). The worker must cut the partial
    batch back before retrying: no torn line, no duplicate, nothing acknowledged early."""
    import errno
    import os as real_os

    import vllm_middleware._partition as partition
    from vllm_middleware_worker import WorkerConfig

    log_dir = tmp_path / "logs"
    admin = redis.Redis.from_url(redis_server.url)
    pipe = admin.pipeline()
    for seq in range(300):
        record = {"request_id": f"r{seq}", "metadata": {"tag": "ro", "seq": seq}}
        pipe.xadd(
            KEYS.stream,
            {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": orjson.dumps(record)},
        )
    pipe.execute()
    failures = {"write": 3, "ftruncate": 2}
    orig_write, orig_ftruncate = real_os.write, real_os.ftruncate  # the patch is module-wide

    def ours(fd: int) -> bool:
        return real_os.readlink(f"/proc/self/fd/{fd}").startswith(str(log_dir))

    def write(fd: int, data: bytes | memoryview) -> int:
        if ours(fd) and failures["write"] > 0:
            failures["write"] -= 1
            orig_write(fd, bytes(data[: len(data) // 2]))  # a partial batch reaches disk
            raise OSError(errno.EROFS, "Read-only file system")
        return orig_write(fd, data)

    def ftruncate(fd: int, length: int) -> None:
        if ours(fd) and failures["ftruncate"] > 0:
            failures["ftruncate"] -= 1
            raise OSError(errno.EROFS, "Read-only file system")
        orig_ftruncate(fd, length)

    monkeypatch.setattr(partition.os, "write", write)
    monkeypatch.setattr(partition.os, "ftruncate", ftruncate)
    cfg = WorkerConfig(
        redis_url=redis_server.url,
        log_dir=str(log_dir),
        consumer="ro",
        block_ms=100,
        batch_size=100,
    )
    consumer = await drain(cfg, timeout=60)
    monkeypatch.undo()
    found = stored(log_dir, "ro")
    assert set(found) == {("ro", s) for s in range(300)}
    assert max(found.values()) == 1
    assert consumer.status.write_failures >= 3 and consumer.disk_error is None
    assert int(admin.hget(KEYS.stats, "requests") or 0) == 300
    admin.close()


async def test_entry_that_keeps_killing_a_fixed_name_worker_is_dead_lettered(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """A worker restarted under the same `--consumer` name re-reads its own pending entries;
    one delivered `max_deliveries` times goes to the dead-letter stream instead of looping."""
    from vllm_middleware_worker import StreamConsumer, WorkerConfig, open_consumer_redis

    admin = redis.Redis.from_url(redis_server.url)
    admin.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    record = orjson.dumps({"request_id": "r1", "metadata": {"tag": "loop", "seq": 1}})
    admin.xadd(KEYS.stream, {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": record})
    for _ in range(3):  # three lives that read it and died before acknowledging
        admin.xreadgroup(KEYS.group, "fixed", {KEYS.stream: "0" if _ else ">"})
    cfg = WorkerConfig(
        redis_url=redis_server.url,
        log_dir=str(tmp_path / "logs"),
        consumer="fixed",
        block_ms=100,
        max_deliveries=4,
    )
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    try:
        await asyncio.wait_for(consumer.run(burst=True), 30)
    finally:
        await client.aclose()
    assert consumer.status.dead_letters == 1 and admin.xlen(KEYS.dead_letter) == 1
    assert admin.xlen(KEYS.stream) == 0
    admin.close()


async def test_worker_started_before_redis_waits_for_it(
    start_worker: WorkerFactory, tmp_path: Path
) -> None:
    server = RedisServerProcess(tmp_dir=tmp_path / "late", appendonly=True)
    try:
        worker = start_worker(server.url, tmp_path / "logs", "w-early", env=worker_env())
        await asyncio.sleep(8)  # longer than arq's own connection retries (~5 s)
        assert worker.poll() is None, "the worker must wait for Redis, not exit"
        await asyncio.to_thread(server.start)
        admin = redis.Redis.from_url(server.url)
        record = orjson.dumps({"request_id": "r", "metadata": {"tag": "late", "seq": 0}})
        admin.xadd(
            KEYS.stream, {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": record}
        )
        late = tmp_path / "logs"
        await until(lambda: len(stored(late, "late", settled=False)) == 1, 40, "record stored")
        admin.close()
    finally:
        server.cleanup()


async def test_worker_drains_a_stream_that_filled_redis_to_maxmemory(tmp_path: Path) -> None:
    """At OOM Redis refuses the worker's intent, heartbeat and ack; only the allow-oom script
    fallbacks let it drain the stream (without them this test times out: checked)."""
    from vllm_middleware_worker import StreamConsumer, WorkerConfig, open_consumer_redis

    server = RedisServerProcess(tmp_dir=tmp_path / "oom", appendonly=True, maxmemory="16mb")
    server.start()
    try:
        admin = redis.Redis.from_url(server.url)
        pipe = admin.pipeline()
        for seq in range(3000):
            rec = orjson.dumps({"request_id": f"r{seq}", "metadata": {"tag": "oom", "seq": seq}})
            pipe.xadd(
                KEYS.stream, {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": rec}
            )
        pipe.execute()
        admin.config_set("maxmemory", "1mb")  # far below the stream: every write refused
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.hset("probe", "f", "v")
        cfg = WorkerConfig(
            redis_url=server.url, log_dir=str(tmp_path / "logs"), consumer="c", block_ms=100
        )
        client = open_consumer_redis(cfg)
        consumer = StreamConsumer(client, cfg)
        try:
            await asyncio.wait_for(consumer.run(burst=True), 30)
        finally:
            await client.aclose()
        found = stored(tmp_path / "logs", "oom")
        assert set(found) == {("oom", s) for s in range(3000)} and max(found.values()) == 1
        assert admin.xlen(KEYS.stream) == 0
        assert int(admin.hget(KEYS.stats, "requests") or 0) == 3000
        admin.close()
    finally:
        server.cleanup()


async def test_redis_killed_while_a_worker_drains_a_backlog(
    redis_server: RedisServerProcess, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """Redis dies (SIGKILL; AOF fsync always) with batches written and acks in flight."""
    total = 100_000
    admin = redis.Redis.from_url(redis_server.url)
    pipe = admin.pipeline(transaction=False)
    for i in range(total):
        record = orjson.dumps({"request_id": f"b{i}", "metadata": {"tag": "backlog", "seq": i}})
        pipe.xadd(
            KEYS.stream, {b"date": b"2026-01-02", b"host": b"h", b"err": b"0", b"rec": record}
        )
    pipe.execute()
    admin.close()
    log_dir = tmp_path / "logs"
    worker = start_worker(redis_server.url, log_dir, "w-backlog", env=worker_env())

    def written() -> int:
        return int(get_statistics(redis_server.url)["total_requests"])

    await until(lambda: written() > 2_000, 60, "draining")
    redis_server.kill()
    # The fault must land mid-drain, or this test proves nothing.
    assert len(stored(log_dir, "backlog")) < total
    await asyncio.sleep(1.0)
    redis_server.restart()
    drained = f"backlog drained: {total} records"
    await until(lambda: len(stored(log_dir, "backlog", settled=False)) >= total, 120, drained)
    await asyncio.sleep(1.0)  # let a late duplicate show up
    found = stored(log_dir, "backlog")
    assert len(found) == total
    assert all(count == 1 for count in found.values()), "duplicates in the files"
    assert worker.poll() is None
