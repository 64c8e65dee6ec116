"""Retention: the plan, the deletion, the writers' idle close that makes it safe, the worker's
cron job (once across workers) and `vllm-mw retention`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from vllm_middleware import load_logs
from vllm_middleware._retention import apply_retention, plan_retention
from vllm_middleware.storage import PartitionWriter, RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import WorkerConfig, make_worker_settings
from vllm_middleware_worker._retention_job import run_retention

from ..conftest import WorkerFactory, wait_for
from .test_health import add_records

TODAY = date(2026, 3, 10)
HOUR = 3600.0


def make_tree(root: Path, days: list[str], *, age_s: float = 2 * HOUR) -> None:
    writer = PartitionWriter(root, "w1", fsync=False)
    for day in days:
        for host in ("a", "b"):
            record = orjson.dumps({"request_id": f"req_{day}_{host}", "timestamp": day})
            writer.write_batch([RecordEntry(day, host, False, record)])
    writer.close()
    old = time.time() - age_s
    for path in root.rglob("*"):
        os.utime(path, (old, old))


def test_plan_takes_only_old_quiet_partitions(tmp_path: Path) -> None:
    make_tree(tmp_path, ["2026-03-01", "2026-03-07", "2026-03-08", "2026-03-09", "2026-03-10"])
    (tmp_path / "date=not-a-date").mkdir()
    plan = plan_retention(tmp_path, 2, today=TODAY, min_age_s=HOUR)
    assert plan.cutoff == "2026-03-08"
    assert [p.date for p in plan.delete] == ["2026-03-01", "2026-03-07"]
    assert all(p.files == 2 and p.bytes > 0 for p in plan.delete)
    # A late record written into an old partition keeps it until it has aged too.
    late = next((tmp_path / "date=2026-03-01").rglob("*.jsonl"))
    os.utime(late)
    plan = plan_retention(tmp_path, 2, today=TODAY, min_age_s=HOUR)
    assert [p.date for p in plan.delete] == ["2026-03-07"]
    assert [p.date for p in plan.recent] == ["2026-03-01"]


def test_apply_deletes_whole_partitions_and_readers_see_the_rest(tmp_path: Path) -> None:
    make_tree(tmp_path, ["2026-03-01", "2026-03-02", "2026-03-09"])
    plan = plan_retention(tmp_path, 2, today=TODAY, min_age_s=HOUR)
    result = apply_retention(plan)
    assert result.deleted == ["2026-03-01", "2026-03-02"] and result.errors == []
    assert result.files == 4 and result.bytes == plan.bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["date=2026-03-09"]
    assert sorted(r.request_id for r in load_logs(tmp_path)) == [
        "req_2026-03-09_a",
        "req_2026-03-09_b",
    ]


def test_a_partition_written_to_after_the_plan_is_put_back(tmp_path: Path) -> None:
    make_tree(tmp_path, ["2026-03-01"])
    plan = plan_retention(tmp_path, 2, today=TODAY, min_age_s=HOUR)
    assert len(plan.delete) == 1
    os.utime(next(tmp_path.rglob("*.jsonl")))  # a late record lands between plan and delete
    result = apply_retention(plan)
    assert result.deleted == [] and "changed during retention, kept" in result.errors[0]
    assert len(load_logs(tmp_path)) == 2


def test_idle_close_never_appends_to_a_closed_file(tmp_path: Path) -> None:
    writer = PartitionWriter(tmp_path, "w1", fsync=False)
    entry = RecordEntry("2026-03-01", "a", False, b'{"request_id":"r1"}')
    writer.write_batch([entry])
    assert writer.close_idle(60) == 0 and writer.open_files == 1
    assert writer.close_idle(0) == 1 and writer.open_files == 0
    writer.write_batch([entry._replace(data=b'{"request_id":"r2"}')])
    writer.close()
    files = sorted(p.name for p in tmp_path.rglob("*.jsonl"))
    assert files == ["w1-000001.jsonl", "w1-000002.jsonl"]


def test_worker_closes_idle_files(
    tmp_path: Path, redis_server: RedisServerProcess, start_worker: WorkerFactory
) -> None:
    logs = tmp_path / "logs"
    proc = start_worker(redis_server.url, logs, "w-idle", env={"VLLM_MW_FILE_IDLE_S": "1"})
    add_records(redis_server.url, 5)
    wait_for(lambda: logs.is_dir() and len(load_logs(logs)) == 5)
    [path] = list(logs.rglob("*.jsonl"))

    def open_in_worker() -> bool:
        fds = Path(f"/proc/{proc.pid}/fd")
        return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())

    assert open_in_worker()
    wait_for(lambda: not open_in_worker(), timeout=15)


async def test_cron_job_runs_once_across_workers_and_counts(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    make_tree(tmp_path / "logs", ["2020-01-01", "2020-01-02", date.today().isoformat()])
    configs = [
        WorkerConfig(
            redis_url=redis_server.url,
            log_dir=str(tmp_path / "logs"),
            consumer=f"w{i}",
            retention_days=7,
        )
        for i in range(3)
    ]
    clients = [aioredis.Redis.from_url(redis_server.url) for _ in configs]
    try:
        runs = [run_retention(c, cfg) for c, cfg in zip(clients, configs, strict=True)]
        results = await asyncio.gather(*runs)
        ran = [r for r in results if "deleted" in r]
        assert len(ran) == 1 and ran[0]["deleted"] == ["2020-01-01", "2020-01-02"]
        assert sum("another worker" in r.get("skipped", "") for r in results) == 2
        stats = await clients[0].hgetall(StreamKeys().stats)
        assert stats[b"retention_partitions_deleted"] == b"2"
        assert int(stats[b"retention_files_deleted"]) == 4
        assert await clients[0].get("vllm:logs:retention:lock") is None  # released
        # The next run finds nothing more to delete.
        assert (await run_retention(clients[1], configs[1]))["deleted"] == []
    finally:
        for client in clients:
            await client.aclose()
    off = WorkerConfig(redis_url=redis_server.url, retention_days=0)
    names = [job.name for job in make_worker_settings(off).cron_jobs]
    assert not any("retention" in name for name in names)
    names = [job.name for job in make_worker_settings(configs[0]).cron_jobs]
    assert any("retention" in name for name in names)


def test_retention_command(tmp_path: Path) -> None:
    make_tree(tmp_path, ["2020-01-01", date.today().isoformat()])

    def run(*args: str) -> tuple[int, dict[str, object]]:
        result = subprocess.run(
            [sys.executable, "-m", "vllm_middleware._cli", "retention", "--json", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode, json.loads(result.stdout)

    code, report = run("--keep-days", "3", "--log-dir", str(tmp_path), "--dry-run")
    assert code == 0 and [p["date"] for p in report["partitions"]] == ["2020-01-01"]  # type: ignore[index]
    assert (tmp_path / "date=2020-01-01").is_dir()
    code, report = run("--keep-days", "3", "--log-dir", str(tmp_path))
    assert code == 0 and report["deleted"] == ["2020-01-01"]
    assert not (tmp_path / "date=2020-01-01").exists() and len(load_logs(tmp_path)) == 2


async def test_cron_job_deletes_unreferenced_media_once_partitions_are_gone(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    from ..client.test_media_gc import path_of, store, write

    logs = tmp_path / "logs"
    old_only, shared, orphan = store(logs, 1), store(logs, 2), store(logs, 3)
    write(logs, "2020-01-01", [old_only, shared])
    write(logs, date.today().isoformat(), [shared])
    past = time.time() - 2 * HOUR
    for path in logs.rglob("*"):
        os.utime(path, (past, past))
    time.sleep(1.0)  # past the grace period (ctime cannot be set back)
    config = WorkerConfig(
        redis_url=redis_server.url,
        log_dir=str(logs),
        consumer="w0",
        retention_days=7,
        media_grace_days=0.5 / 86400,
    )
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        report = await run_retention(client, config)
        assert report["deleted"] == ["2020-01-01"]
        assert report["media"] == {"deleted": 2, "bytes": 6400, "errors": []}
        assert path_of(logs, shared).exists()
        assert not path_of(logs, old_only).exists() and not path_of(logs, orphan).exists()
        stats = await client.hgetall(StreamKeys().stats)
        assert stats[b"retention_media_deleted"] == b"2"
        # Nothing deleted since the last complete scan: the tree is not read again.
        again = await run_retention(client, config)
        assert "skipped" in again["media"]
        # An incomplete scan (a symbolic link the reader skips) is retried at the next tick.
        await client.set("vllm:logs:retention:media_pending", b"1")
        (logs / f"date={date.today().isoformat()}" / "host=h" / "x.jsonl").symlink_to(tmp_path)
        refused = await run_retention(client, config)
        assert "symbolic links" in refused["media"]["refused"]
        assert await client.exists("vllm:logs:retention:media_pending")
    finally:
        await client.aclose()
