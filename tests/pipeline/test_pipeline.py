"""End to end: several app clients -> (Redis stream -> two worker processes | embedded) -> files."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import vllm_middleware._recorder as recorder_module
from vllm_middleware import (
    APIStatusError,
    VLLMMiddleware,
    get_statistics,
    iter_log_files,
    load_logs,
)
from vllm_middleware.storage import sanitize_partition_value
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

from ..conftest import WorkerFactory, wait_for

DAYS = ["2026-03-01", "2026-03-02", "2026-03-03"]
HOSTS = ["app-0", "app-1.example.com", "../evil/host", "app-3"]
PER_CLIENT = 800


def spread_over_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make consecutive records fall on three UTC dates, to exercise date partitions."""
    cycle = itertools.cycle(DAYS)

    def fake_now() -> datetime:
        real = datetime.now(UTC)
        day = datetime.fromisoformat(next(cycle))
        return real.replace(year=day.year, month=day.month, day=day.day)

    monkeypatch.setattr(recorder_module, "utc_now", fake_now)


async def send_traffic(clients: list[VLLMMiddleware]) -> tuple[set[tuple[int, int]], int]:
    """Each client sends PER_CLIENT requests concurrently; every 10th fails on the server."""
    gate = asyncio.Semaphore(64)
    errors = 0

    async def one(c: int, seq: int) -> None:
        nonlocal errors
        client = clients[c]
        meta = {"client": c, "seq": seq}
        async with gate:
            try:
                if seq % 10 == 9:
                    trigger = "[[status:503]]" if seq % 20 == 19 else ""
                    await client.chat_completion(
                        [{"role": "user", "content": f"fail {trigger}"}],
                        model="vllm:qwen-2.5-omni-7b" if trigger else "no-such-model",
                        metadata=meta,
                    )
                elif seq % 3 == 0:
                    await client.completions(
                        prompt=f"prompt {seq}", model="vllm:qwen-2.5-omni-7b", metadata=meta
                    )
                else:
                    await client.chat_completion(
                        [{"role": "user", "content": f"hello {c} {seq}"}],
                        model="vllm:qwen-2.5-omni-7b",
                        temperature=0.5,
                        max_tokens=32,
                        metadata=meta,
                        top_k=20,  # a vLLM extra: passes through and is recorded
                    )
            except APIStatusError:
                errors += 1

    await asyncio.gather(*(one(c, seq) for seq in range(PER_CLIENT) for c in range(len(clients))))
    expected = {(c, seq) for c in range(len(clients)) for seq in range(PER_CLIENT)}
    return expected, errors


def check_files(log_dir: Path, expected: set[tuple[int, int]], errors: int) -> list[Any]:
    """Every record exactly once, in the partition of its own date and host."""
    seen: list[tuple[int, int]] = []
    records = []
    for path in iter_log_files(log_dir):
        day = path.parent.parent.name.removeprefix("date=")
        host_dir = path.parent.name.removeprefix("host=")
        assert path.resolve().is_relative_to(log_dir.resolve())
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            assert record["timestamp"][:10] == day
            assert sanitize_partition_value(record["host"]) == host_dir
            seen.append((record["metadata"]["client"], record["metadata"]["seq"]))
            records.append(record)
    assert len(seen) == len(set(seen)), "duplicate records in the files"
    assert set(seen) == expected, "records missing from the files"
    assert len({r["request_id"] for r in records}) == len(records)
    failed = [r for r in records if r["error"] is not None]
    assert len(failed) == errors
    for record in failed:
        assert record["status_code"] in (404, 503)
        assert record["error_detail"]["status_code"] == record["status_code"]
    for record in records:
        for key in (
            "timestamp", "request_id", "model", "response", "parameters", "latency_ms",
            "error", "metadata", "host", "endpoint", "status_code", "usage", "stream",
            "ttft_ms", "schema_version",
        ):  # fmt: skip
            assert key in record, key
        assert ("messages" in record) != ("prompt" in record)
        if record["error"] is None:
            assert record["status_code"] == 200 and record["usage"]["total_tokens"] > 0
        if record["endpoint"] == "chat/completions" and record["error"] is None:
            assert record["parameters"] == {"temperature": 0.5, "max_tokens": 32, "top_k": 20}
    return records


def check_date_filters(log_dir: Path, records: list[Any]) -> None:
    by_day = Counter(r["timestamp"][:10] for r in records)
    assert sorted(by_day) == DAYS
    assert len(load_logs(log_dir, start_date="20260302", end_date="20260302")) == by_day[DAYS[1]]
    assert len(load_logs(log_dir, start_date="2026-03-02")) == by_day[DAYS[1]] + by_day[DAYS[2]]
    assert len(load_logs(log_dir, end_date="20260301")) == by_day[DAYS[0]]


@pytest.mark.slow
async def test_redis_pipeline_two_workers_exactly_once(
    fake_vllm: FakeVLLMServer,
    redis_server: RedisServerProcess,
    start_worker: WorkerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spread_over_days(monkeypatch)
    log_dir = tmp_path / "logs"
    for name in ("w1", "w2"):
        start_worker(redis_server.url, log_dir, name)
    clients = [
        VLLMMiddleware(base_url=fake_vllm.base_url, redis_url=redis_server.url, host=host)
        for host in HOSTS
    ]
    expected, errors = await send_traffic(clients)
    for client in clients:
        await client.close()
        assert client.get_statistics()["client"]["dropped"] == 0
    total = len(expected)

    wait_for(lambda: get_statistics(redis_server.url)["total_requests"] >= total, timeout=60)
    records = check_files(log_dir, expected, errors)
    check_date_filters(log_dir, records)

    # The cron job publishes the file count and size: wait for a scan after the last write.
    files = list(iter_log_files(log_dir))
    size = sum(p.stat().st_size for p in files)
    scanned = {"log_files_count": len(files), "total_log_size_mb": round(size / 2**20, 3)}
    wait_for(lambda: scanned.items() <= get_statistics(redis_server.url).items(), timeout=30)
    stats = get_statistics(redis_server.url)
    assert stats["total_requests"] == total
    assert stats["total_errors"] == errors
    assert stats["bytes_written"] == size
    assert stats["files_created"] == len(files)
    assert stats["total_log_size_mb"] == round(size / 2**20, 3)
    assert stats["log_directory"] == str(log_dir)
    assert stats["by_host"] == {h: PER_CLIENT for h in HOSTS}
    assert stats["by_date"] == dict(Counter(r["timestamp"][:10] for r in records))
    assert stats["stream_length"] == 0 and stats["pending"] == 0  # acked entries are deleted
    assert stats["dropped_records"] == 0 and stats["dead_letters"] == 0
    # Both workers took part: each owns files.
    owners = {p.name.rsplit("-", 1)[0] for p in files}
    assert owners == {"w1", "w2"}


async def test_embedded_mode_passes_the_same_record_checks(
    fake_vllm: FakeVLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)
    spread_over_days(monkeypatch)
    log_dir = tmp_path / "logs"
    clients = [
        VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=log_dir, host=host) for host in HOSTS
    ]
    expected, errors = await send_traffic(clients)
    for client in clients:
        await client.close()
    records = check_files(log_dir, expected, errors)
    check_date_filters(log_dir, records)
    stats = get_statistics(log_dir=log_dir)
    assert stats["total_requests"] == len(expected) and stats["total_errors"] == errors
    assert stats["log_files_count"] == len(list(iter_log_files(log_dir)))
