"""`vllm-mw dead-letters` and `vllm-mw spool`, run as an operator runs them, against real
redis-server and worker processes."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import redis as redis_sync
import redis.asyncio as aioredis
from vllm_middleware import load_logs
from vllm_middleware._sinks._destination import redis_shipper
from vllm_middleware._sinks._shipping import ShippingSettings
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess

from ..conftest import WorkerFactory, wait_for

KEYS = StreamKeys()


def vllm_mw(*args: str, spool: Path | None = None) -> tuple[int, Any]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    if spool is not None:
        environment["VLLM_MW_SPOOL_DIR"] = str(spool)
    result = subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", *args, "--json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def record(i: int, size: int = 100) -> bytes:
    return orjson.dumps({"request_id": f"req_{i}", "model": "m", "pad": "x" * size})


def xadd_record(url: str, i: int, size: int) -> None:
    client = redis_sync.Redis.from_url(url)
    fields = {b"date": b"2026-01-02", b"host": b"app-1", b"err": b"0", b"n": b"1"}
    fields[b"rec"] = record(i, size)
    client.xadd(KEYS.stream, fields)
    client.close()


def test_dead_letters_list_show_replay_purge(
    tmp_path: Path, redis_server: RedisServerProcess, start_worker: WorkerFactory
) -> None:
    url, logs = redis_server.url, tmp_path / "logs"
    small = {"VLLM_MW_MAX_RECORD_BYTES": "1000"}
    worker = start_worker(url, logs, "w-small", env=small)
    for i, size in enumerate((50, 5000, 6000)):  # the two large ones are dead-lettered
        xadd_record(url, i, size)
    wait_for(lambda: vllm_mw("dead-letters", "list", "--redis-url", url)[1].__len__() == 2)
    code, letters = vllm_mw("dead-letters", "list", "--redis-url", url)
    assert code == 0 and all(row["records"] == 1 and row["host"] == "app-1" for row in letters)
    assert all("max_record_bytes" in row["reason"] or "bytes" in row["reason"] for row in letters)
    first, second = letters
    code, shown = vllm_mw("dead-letters", "show", first["id"], "--redis-url", url)
    assert code == 0 and json.loads(shown["records_text"][0])["request_id"] == "req_1"
    assert vllm_mw("dead-letters", "show", "1-1", "--redis-url", url) == (1, None)

    # The fix: a worker that accepts larger records. Then replay one, purge the other.
    worker.terminate()
    worker.wait(timeout=30)
    start_worker(url, logs, "w-large", env={"VLLM_MW_MAX_RECORD_BYTES": "100000"})
    code, replayed = vllm_mw("dead-letters", "replay", first["id"], "--redis-url", url)
    assert code == 0 and replayed[first["id"]]
    wait_for(lambda: len(load_logs(logs)) == 2)
    assert sorted(r.request_id for r in load_logs(logs)) == ["req_0", "req_1"]
    # Replayed once only: a second replay finds nothing (exit 1).
    code, again = vllm_mw("dead-letters", "replay", first["id"], "--redis-url", url)
    assert code == 1 and again == {first["id"]: None}
    code, purged = vllm_mw("dead-letters", "purge", "--all", "--redis-url", url)
    assert code == 0 and purged == {second["id"]: ""}
    assert vllm_mw("dead-letters", "list", "--redis-url", url)[1] == []
    code, history = vllm_mw("dead-letters", "log", "--redis-url", url)
    purge_row, replay_row = history  # newest first
    assert replay_row["action"] == "replayed" and replay_row["dead_id"] == first["id"]
    assert replay_row["source_id"] == first["source_id"]
    assert replay_row["new_id"] == replayed[first["id"]]
    assert purge_row["action"] == "purged" and purge_row["dead_id"] == second["id"]
    assert purge_row["source_id"] == second["source_id"] and purge_row["reason"]


UNREACHABLE = ("--redis-url", "redis://:pw@127.0.0.1:1/0")


def test_dead_letters_report_an_unreachable_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", "dead-letters", "list", *UNREACHABLE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Error" in result.stderr and "pw" not in result.stderr


async def spool_records(redis_url: str, root: Path, count: int, start: int) -> int:
    """A client whose Redis is unreachable spools `count` records, then exits (closes)."""
    settings = ShippingSettings(spool_dir=str(root), redis_timeout=0.5)
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5)
    sink = redis_shipper(client, keys=KEYS, owns_client=True, shipping=settings)
    for i in range(start, start + count):
        sink.submit(RecordEntry("2026-01-02", "app-1", False, record(i)))
    await sink.aclose(timeout=5)
    return sink.counters.spooled


def stream_records(url: str) -> list[str]:
    client = redis_sync.Redis.from_url(url)
    ids = []
    for _, fields in client.xrange(KEYS.stream):
        ids += [orjson.loads(line)["request_id"] for line in fields[b"rec"].split(b"\n")]
    client.close()
    return ids


def test_spool_list_and_drain_of_a_spool_keyed_to_another_redis(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    root = tmp_path / "spools"
    gone = "redis://127.0.0.1:1/0"  # the Redis these apps used to log to
    assert asyncio.run(spool_records(gone, root, 300, 0)) == 300
    code, spools = vllm_mw("spool", "list", "--redis-url", redis_server.url, spool=root)
    [foreign] = spools
    assert code == 0 and foreign["stranded_segments"] == foreign["segments"] >= 1
    assert foreign["this_redis"] is False
    # Drained without --all: this Redis's own spool is empty, the foreign one stays.
    code, result = vllm_mw("spool", "drain", "--redis-url", redis_server.url, spool=root)
    assert code == 0 and result["replayed"] == 0 and stream_records(redis_server.url) == []
    # A second stranded spool, one of whose segments a live process holds: left alone.
    other = "redis://127.0.0.1:2/0"
    assert asyncio.run(spool_records(other, root, 50, 1000)) == 50
    [held] = [p for p in root.glob("*/*.seg") if p.parent != Path(foreign["path"])]
    with open(held, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        args = ("spool", "drain", "--redis-url", redis_server.url, "--all")
        code, result = vllm_mw(*args, spool=root)
    assert code == 0 and result["held"] == [str(held)] and result["error"] is None
    assert result["replayed"] == 300 and result["remaining_bytes"] == 0
    assert sorted(stream_records(redis_server.url)) == sorted(f"req_{i}" for i in range(300))
    # Released: the next drain takes it, and nothing is replayed twice.
    code, result = vllm_mw("spool", "drain", "--redis-url", redis_server.url, "--all", spool=root)
    assert code == 0 and result["replayed"] == 50
    replayed = stream_records(redis_server.url)
    assert len(replayed) == len(set(replayed)) == 350
    code, spools = vllm_mw("spool", "list", spool=root)
    assert spools == []


def test_spool_drain_to_an_unreachable_redis_keeps_the_spool(tmp_path: Path) -> None:
    root = tmp_path / "spools"
    assert asyncio.run(spool_records("redis://127.0.0.1:1/0", root, 20, 0)) == 20
    unreachable = "redis://127.0.0.1:3/0"
    code, result = vllm_mw("spool", "drain", "--redis-url", unreachable, "--all", spool=root)
    assert code == 2 and result["error"] and result["replayed"] == 0
    code, spools = vllm_mw("spool", "list", spool=root)
    assert sum(s["bytes"] for s in spools) > 0
