"""`vllm-mw health`: real redis-server processes, real worker processes, the real command line."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_sync
from vllm_middleware._health import Facts, Thresholds, assess, redact_url
from vllm_middleware.storage import StreamKeys
from vllm_middleware_testing import RedisServerProcess

from ..conftest import WorkerFactory, wait_for

KEYS = StreamKeys()


def health(*args: str, spool: Path | None = None) -> tuple[int, dict[str, Any]]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    if spool is not None:
        environment["VLLM_MW_SPOOL_DIR"] = str(spool)
    result = subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", "health", "--json", "--timeout", "2", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout, result.stderr  # a report in every case, never a traceback
    return result.returncode, json.loads(result.stdout)


def add_records(url: str, count: int, host: str = "app-1") -> None:
    client = redis_sync.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(count):
            rec = orjson.dumps({"request_id": f"req_{i}", "model": "m", "error": None})
            fields = {b"date": b"2026-01-02", b"host": host.encode(), b"err": b"0", b"n": b"1"}
            fields[b"rec"] = rec
            pipe.xadd(KEYS.stream, fields)
        pipe.execute()
    finally:
        client.close()


@pytest.fixture
def bounded_redis(tmp_path: Path) -> Any:
    (tmp_path / "bounded").mkdir()
    server = RedisServerProcess(tmp_dir=tmp_path / "bounded", appendonly=True, maxmemory="64mb")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_healthy_with_a_worker_then_degraded_when_it_stops(
    tmp_path: Path, bounded_redis: RedisServerProcess, start_worker: WorkerFactory
) -> None:
    logs = tmp_path / "logs"
    worker = start_worker(bounded_redis.url, logs, "w-health")
    add_records(bounded_redis.url, 50)

    def written() -> bool:
        # The worker's own figures come from its heartbeat, written every few seconds.
        code, report = health("--redis-url", bounded_redis.url)
        beats = [worker["records"] for worker in report.get("workers", [])]
        return code == 0 and report["lag"] == 0 and report["pending"] == 0 and beats == [50]

    wait_for(written)
    code, report = health("--redis-url", bounded_redis.url)
    assert code == 0 and report["status"] == "healthy" and report["reasons"] == []
    [alive] = report["workers"]
    assert alive["consumer"] == "w-health" and alive["state"] == "ok"
    assert alive["records"] == 50 and alive["last_batch_age_s"] is not None
    assert alive["host"] == os.uname().nodename
    assert report["maxmemory"] == 64 * 2**20 and report["oldest_unwritten_age_s"] == 0.0
    # --host: this machine's worker counts, another host's does not (down for that host).
    assert health("--redis-url", bounded_redis.url, "--host", alive["host"])[0] == 0
    code, report = health("--redis-url", bounded_redis.url, "--host", "elsewhere")
    assert code == 2 and report["reasons"] == ["no live worker on host elsewhere"]

    worker.terminate()
    worker.wait(timeout=30)
    code, report = health("--redis-url", bounded_redis.url)
    assert code == 1 and report["status"] == "degraded"
    assert report["reasons"] == ["0 live workers (at least 1 expected)"]


def test_degraded_when_lag_pending_and_age_grow(
    tmp_path: Path, bounded_redis: RedisServerProcess
) -> None:
    client = redis_sync.Redis.from_url(bounded_redis.url)
    client.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    add_records(bounded_redis.url, 30)
    # A consumer (with no heartbeat: it died) took 10 entries and never acknowledged them.
    client.xreadgroup(KEYS.group, "gone", {KEYS.stream: ">"}, count=10)
    client.close()
    time.sleep(1.2)
    code, report = health(
        "--redis-url", bounded_redis.url, "--max-lag", "5", "--max-pending", "5", "--max-age", "1"
    )
    assert code == 1
    assert report["lag"] == 20 and report["pending"] == 10
    assert report["consumers_without_heartbeat"] == [{"consumer": "gone", "pending": 10}]
    reasons = "\n".join(report["reasons"])
    assert "lag 20 records > 5" in reasons and "pending 10 records > 5" in reasons
    assert "oldest unwritten record" in reasons and report["oldest_unwritten_age_s"] >= 1.0
    # The same backlog under the default thresholds is only "no worker".
    code, report = health("--redis-url", bounded_redis.url, "--min-workers", "0")
    assert code == 0, report["reasons"]


def test_down_when_redis_is_unreachable_or_refuses_auth(tmp_path: Path) -> None:
    (tmp_path / "auth").mkdir()
    server = RedisServerProcess(tmp_dir=tmp_path / "auth", maxmemory="16mb", password="s3cret")
    server.start()
    try:
        assert health("--redis-url", server.url, "--min-workers", "0")[0] == 0
        wrong = server.url.replace("s3cret", "wrong")
        code, report = health("--redis-url", wrong)
        assert code == 2 and report["status"] == "down" and "s3cret" not in json.dumps(report)
        no_auth = f"redis://127.0.0.1:{server.port}/0"
        code, report = health("--redis-url", no_auth)
        assert code == 2 and "Authentication" in report["reasons"][0]
    finally:
        server.stop()
    code, report = health("--redis-url", server.url)
    assert code == 2 and report["reachable"] is False
    assert report["reasons"][0].startswith("Redis unreachable")


def test_survives_damaged_data(tmp_path: Path, bounded_redis: RedisServerProcess) -> None:
    client = redis_sync.Redis.from_url(bounded_redis.url)
    client.set(KEYS.heartbeat("junk"), b"\xff not json", px=60_000)
    client.set(KEYS.heartbeat("list"), b"[1, 2]", px=60_000)
    client.rpush(KEYS.heartbeat("wrongtype"), b"x")
    client.set(KEYS.heartbeat("fine"), orjson.dumps({"consumer": "fine", "state": "ok"}))
    client.rpush(KEYS.stats, b"not a hash")
    client.set(KEYS.dead_letter, b"not a stream")
    client.set(KEYS.stream, b"not a stream either")
    client.close()
    code, report = health("--redis-url", bounded_redis.url)
    assert code == 1
    damaged = "\n".join(report["damaged"])
    for key in ("alive:junk", "alive:list", "alive:wrongtype", KEYS.stats, KEYS.dead_letter):
        assert key in damaged
    assert f"{KEYS.stream}: WRONGTYPE" in damaged
    assert [w["consumer"] for w in report["workers"]] == ["fine"]
    assert report["workers"][0]["last_batch_age_s"] is None


def test_degraded_without_maxmemory_or_near_it(tmp_path: Path, redis_server: Any) -> None:
    code, report = health("--redis-url", redis_server.url, "--min-workers", "0")
    assert code == 1 and report["maxmemory"] == 0
    assert report["reasons"] == ["Redis has no maxmemory: it grows until the host kills it"]
    client = redis_sync.Redis.from_url(redis_server.url)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", str(int(used * 1.05)))
    client.close()
    code, report = health("--redis-url", redis_server.url, "--min-workers", "0")
    assert code == 1 and "of maxmemory > 80%" in report["reasons"][0]


def test_stranded_spool_is_reported(tmp_path: Path, bounded_redis: RedisServerProcess) -> None:
    spool = tmp_path / "spools"
    held = spool / "vllm-logs-aaaa" / "1-held.seg"
    stranded = spool / "vllm-logs-bbbb" / "1-dead.seg"
    for path in (held, stranded):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 100)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    with open(held, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # a live process replaying it
        code, report = health("--redis-url", bounded_redis.url, "--min-workers", "0", spool=spool)
    assert code == 1
    by_dir = {Path(s["path"]).name: s for s in report["spools"]}
    assert by_dir["vllm-logs-aaaa"]["stranded_segments"] == 0
    assert by_dir["vllm-logs-bbbb"]["stranded_segments"] == 1
    assert by_dir["vllm-logs-bbbb"]["bytes"] == 100
    [reason] = report["reasons"]
    assert "vllm-logs-bbbb: 1 stranded segments" in reason


def test_assess_is_pure_and_orders_the_verdicts() -> None:
    ok = Facts(redis_url="redis://x", reachable=True, used_memory=10, maxmemory=100)
    ok.workers = [{"consumer": "a", "host": "h", "state": "ok"}]
    ok.lag = ok.pending = ok.dead_letters = 0
    assert assess(ok, Thresholds()) == ("healthy", [])
    ok.workers[0].update(state="disk_error", disk_error="OSError: [Errno 28] No space")
    status, reasons = assess(ok, Thresholds())
    assert status == "degraded" and "No space" in reasons[0]
    ok.dead_letters = 3
    assert len(assess(ok, Thresholds(max_dead_letters=3))[1]) == 1
    assert len(assess(ok, Thresholds())[1]) == 2
    assert assess(Facts(redis_url="r", error="boom"), Thresholds()) == (
        "down",
        ["Redis unreachable: boom"],
    )


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
