"""Deterministic crash points (`VLLM_MW_CRASH_AT`, `_crash.py`) in real worker and writer
processes, with a real Redis: a process that dies at any step of the write/ack protocol loses
no record and duplicates none. And a spy: every acknowledged batch was synced first."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from vllm_middleware import get_statistics, iter_log_files
from vllm_middleware._crash import CRASH_EXIT
from vllm_middleware._sinks._destination import file_shipper
from vllm_middleware._sinks._file_sink import FileSink
from vllm_middleware._sinks._redis_sink import _SHIP_BATCH, pack_batch
from vllm_middleware._sinks._shipping import ShippingSettings
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess

from ..client.test_writer_process import assert_exactly, entries, ship
from ..conftest import WorkerFactory, drain, wait_for
from ..worker.test_worker import config

KEYS = StreamKeys()
TOTAL = 3000


def fill(url: str, total: int = TOTAL) -> None:
    """Ship `total` records as the client does (bundles of 2 partitions, flushes of 500)."""
    client = sync_redis.Redis.from_url(url)
    script = client.register_script(_SHIP_BATCH)
    for first in range(0, total, 500):
        batch = [
            RecordEntry(
                "2026-01-02",
                f"h{i % 2}",
                False,
                orjson.dumps({"request_id": f"r{i:05d}", "error": None, "pad": "p" * 300}),
            )
            for i in range(first, min(total, first + 500))
        ]
        script(keys=[KEYS.stream, f"m{first}", KEYS.stats], args=pack_batch(batch, 0, 0))
    client.close()


def ids_in_files(log_dir: Path) -> list[str]:
    """Every line, strictly: a torn or unparsable line fails the test."""
    ids = []
    for path in iter_log_files(log_dir):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"torn line at the end of {path}"
        ids += [json.loads(line)["request_id"] for line in data.splitlines()]
    return ids


WORKER_POINTS = [
    "before-write",
    "after-write",
    "after-fsync",
    "before-ack",
    "after-ack",
    "rotation",
]
# Where the crashed batch's bytes are on disk but not acknowledged: recovery must cut them.
CUT_EXPECTED = {"after-write", "after-fsync", "before-ack"}


@pytest.mark.parametrize("restart", ["same-name", "other-worker"])
@pytest.mark.parametrize("point", WORKER_POINTS)
def test_a_worker_crashing_at_each_step_loses_and_duplicates_nothing(
    redis_server: RedisServerProcess,
    start_worker: WorkerFactory,
    tmp_path: Path,
    point: str,
    restart: str,
) -> None:
    log_dir = tmp_path / "logs"
    marker = tmp_path / "crashed"
    fill(redis_server.url)
    env = {
        "VLLM_MW_CRASH_AT": f"{point}:2:{marker}",  # the second batch (or rotation)
        "VLLM_MW_BATCH_SIZE": "500",
        "VLLM_MW_BLOCK_MS": "200",
        "VLLM_MW_MAX_LOG_SIZE_MB": "0.1",  # ~250 records per file: rotations mid-batch
    }
    first = start_worker(redis_server.url, log_dir, "w1", env=env)
    assert first.wait(timeout=60) == CRASH_EXIT
    assert marker.exists()
    name = "w1" if restart == "same-name" else "w2"
    second = start_worker(redis_server.url, log_dir, name, env=env)

    def done() -> bool:
        stats = get_statistics(redis_server.url)
        return bool(stats["pending"] == 0 and stats["stream_length"] == 0 and stats["lag"] == 0)

    wait_for(done, timeout=60)
    ids = ids_in_files(log_dir)
    assert len(ids) == TOTAL, f"{len(ids)} lines, {len(set(ids))} distinct"
    assert sorted(ids) == [f"r{i:05d}" for i in range(TOTAL)]
    assert get_statistics(redis_server.url)["total_requests"] == TOTAL
    second.terminate()
    assert second.wait(timeout=20) == 0
    log = (tmp_path / f"worker-{name}.log").read_text()
    cut = re.search(r"removed (\d+) unacknowledged bytes written by w1", log)
    if point in CUT_EXPECTED:  # the intent/truncate path really ran
        assert cut is not None and int(cut.group(1)) > 0, log
    assert "refused" not in log, log


WRITER_POINTS = ["after-plan", "before-write", "after-write", "after-fsync", "rotation"]


@pytest.mark.parametrize("point", WRITER_POINTS)
async def test_an_embedded_writer_crashing_at_each_step_loses_and_duplicates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    marker = tmp_path / "crashed"
    # Read at import by the writer processes started from now on (this process's own
    # crash points were read at its import, unset).
    monkeypatch.setenv("VLLM_MW_CRASH_AT", f"{point}:2:{marker}")
    settings = ShippingSettings(
        batch_size=50, flush_interval=0.01, retry_backoff=(0.01, 0.05), embedded_writer="process"
    )
    sink = file_shipper(tmp_path / "logs", max_bytes=4096, shipping=settings)  # ~40 records a file
    for first in range(0, 200, 50):
        await ship(sink, entries(first, 50))
    await sink.aclose()
    assert marker.exists(), "the writer never reached the crash point"
    assert isinstance(sink.sink, FileSink)
    assert sink.sink.process is not None and sink.sink.process.starts == 2
    assert_exactly(tmp_path / "logs", 200)


async def test_every_acknowledged_batch_was_synced_first(
    redis: aioredis.Redis,
    redis_server: RedisServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A spy on fdatasync and on the acknowledgement: when a batch is acknowledged, its intent
    is recorded in Redis (names the batch's entries) and every byte it names is synced."""
    import vllm_middleware._partition as partition
    from vllm_middleware_worker._ack import Acknowledger

    synced: dict[tuple[int, int], int] = {}  # (device, inode) -> size when last synced
    datasync = partition._datasync

    def spy_sync(fd: int) -> None:
        datasync(fd)
        stat = os.fstat(fd)
        synced[(stat.st_dev, stat.st_ino)] = stat.st_size

    checked: list[int] = []
    send = Acknowledger.send

    async def spy_send(self: Acknowledger, ids: list[bytes], *args: Any, **kw: Any) -> None:
        field = args[-1] if args else kw["field"]
        raw = await self.redis.hget(self.keys.inflight, field)
        assert raw is not None, "acknowledging a batch whose intent is not recorded"
        intent = orjson.loads(raw)
        assert intent["ids"] == [ids[0].decode(), ids[-1].decode()]
        for relative, offset, length in intent["parts"]:
            stat = (tmp_path / relative).stat()
            assert synced.get((stat.st_dev, stat.st_ino), -1) >= offset + length, relative
        checked.append(len(intent["parts"]))
        await send(self, ids, *args, **kw)

    monkeypatch.setattr(partition, "_datasync", spy_sync)
    monkeypatch.setattr(Acknowledger, "send", spy_send)
    await asyncio.to_thread(fill, redis_server.url)
    await drain(config(redis_server, tmp_path, "w", batch_size=300, max_log_size_mb=0.1))
    assert len(checked) >= 10 and sum(checked) > len(checked)  # several files per batch too
    assert len(ids_in_files(tmp_path)) == TOTAL
