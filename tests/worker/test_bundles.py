"""Bundles: several records of one (date, host) in one stream entry, from the client's packing
through the worker's checks to the files, including damaged bundles and the read sizing."""

from __future__ import annotations

import zlib
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from vllm_middleware import get_statistics, iter_logs, load_logs
from vllm_middleware._keys import (
    BUNDLE_BYTES,
    BUNDLE_RECORDS,
    ENTRY_FIELDS,
    FIELD_COUNT,
    FIELD_DATE,
    FIELD_ERROR,
    FIELD_HOST,
    FIELD_RECORD,
    FIELD_SUM,
)
from vllm_middleware._partition import PartitionLines
from vllm_middleware._sinks._redis_sink import _SHIP_BATCH, pack_batch
from vllm_middleware.storage import PartitionWriter, RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess
from vllm_middleware_worker import StreamConsumer, WorkerConfig, open_consumer_redis

from ..conftest import drain

KEYS = StreamKeys()


def record(i: int, *, pad: int = 0, error: bool = False) -> bytes:
    return orjson.dumps({"request_id": f"r{i}", "error": "boom" if error else None, "p": "x" * pad})


def bundle(date: str, host: str, lines: list[bytes], *, count: int | None = None,
           errors: int = 0) -> dict[bytes, bytes]:  # fmt: skip
    return {
        FIELD_DATE: date.encode(),
        FIELD_HOST: host.encode(),
        FIELD_ERROR: str(errors).encode(),
        FIELD_COUNT: str(len(lines) if count is None else count).encode(),
        FIELD_RECORD: b"\n".join(lines),
    }


async def drain_to(redis_server: RedisServerProcess, log_dir: Path, **kw: object) -> StreamConsumer:
    return await drain(
        WorkerConfig(
            redis_url=redis_server.url, log_dir=str(log_dir), consumer="w1", block_ms=100, **kw
        )
    )


def request_ids(log_dir: Path) -> list[str]:
    return [r["request_id"] for r in iter_logs(log_dir) if "request_id" in r]


async def test_pack_batch_bundles_by_partition_within_limits(redis: aioredis.Redis) -> None:
    script = redis.register_script(_SHIP_BATCH)
    batch = [
        RecordEntry(
            "2026-01-02" if i % 7 else "2026-01-03",
            f"h{i % 3}",
            i % 5 == 0,
            record(i, pad=(i * 37) % 3000 if i != 500 else BUNDLE_BYTES * 2, error=i % 5 == 0),
        )
        for i in range(1200)
    ]
    assert await script(keys=[KEYS.stream, "m", KEYS.stats], args=pack_batch(batch, 0, 0)) == 1200
    rows = await redis.xrange(KEYS.stream)
    seen: dict[tuple[str, str], list[int]] = {}
    for _, fields in rows:
        assert list(fields) == list(ENTRY_FIELDS)
        assert int(fields[FIELD_SUM]) == zlib.crc32(fields[FIELD_RECORD])
        lines = fields[FIELD_RECORD].split(b"\n")
        assert len(lines) == int(fields[FIELD_COUNT]) <= BUNDLE_RECORDS
        # Only a record larger than the limit makes a larger bundle, and it is alone.
        assert len(fields[FIELD_RECORD]) <= BUNDLE_BYTES or len(lines) == 1
        parsed = [orjson.loads(line) for line in lines]
        assert int(fields[FIELD_ERROR]) == sum(p["error"] is not None for p in parsed)
        key = (fields[FIELD_DATE].decode(), fields[FIELD_HOST].decode())
        seen.setdefault(key, []).extend(int(p["request_id"][1:]) for p in parsed)
    want: dict[tuple[str, str], list[int]] = {}
    for i, entry in enumerate(batch):
        want.setdefault((entry.date, entry.host), []).append(i)
    assert seen == want  # every record once, in its partition, in order
    assert len(rows) < 60  # bundled: 1200 records in a few dozen entries


async def test_one_record_per_entry_when_asked(redis: aioredis.Redis) -> None:
    script = redis.register_script(_SHIP_BATCH)
    batch = [RecordEntry("2026-01-02", "h", False, record(i)) for i in range(5)]
    args = pack_batch(batch, 0, 0, bundle_records=1)
    await script(keys=[KEYS.stream, "m", KEYS.stats], args=args)
    rows = await redis.xrange(KEYS.stream)
    assert [fields[FIELD_COUNT] for _, fields in rows] == [b"1"] * 5


async def test_worker_writes_bundles_whole_and_counts_records(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    script = redis.register_script(_SHIP_BATCH)
    batch = [
        RecordEntry("2026-01-02", f"h{i % 2}", i % 4 == 0, record(i, error=i % 4 == 0))
        for i in range(3000)
    ]
    await script(keys=[KEYS.stream, "m", KEYS.stats], args=pack_batch(batch, 0, 0))
    consumer = await drain_to(redis_server, tmp_path / "logs", batch_size=500)
    assert sorted(request_ids(tmp_path / "logs")) == sorted(f"r{i}" for i in range(3000))
    # Reads are sized in records, not entries: batches of about 500 records, not 500 bundles.
    assert consumer.status.batches >= 5
    stats = get_statistics(redis_server.url)
    assert stats["total_requests"] == 3000 and stats["total_errors"] == 750
    assert stats["by_host"] == {"h0": 1500, "h1": 1500}
    assert await redis.xlen(KEYS.stream) == 0


async def test_a_damaged_bundle_is_taken_apart_and_only_bad_records_dead_lettered(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    good = [record(i) for i in range(4)]
    # A line that is not JSON, a line that is JSON but not an object, a record split by a
    # raw newline, and a wrong count on an otherwise fine bundle.
    await redis.xadd(KEYS.stream, bundle("2026-01-02", "h", [good[0], b"{oops", good[1]]))
    await redis.xadd(KEYS.stream, bundle("2026-01-02", "h", [b"[1, 2]", good[2]]))
    await redis.xadd(KEYS.stream, bundle("2026-01-02", "h", [b'{"a":', b"1}"], count=1))
    await redis.xadd(KEYS.stream, bundle("2026-01-02", "h", [good[3], record(9, error=True)],
                                         count=5, errors=4))  # fmt: skip
    await drain_to(redis_server, tmp_path / "logs")
    assert sorted(request_ids(tmp_path / "logs")) == ["r0", "r1", "r2", "r3", "r9"]
    lines = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("*.jsonl")).splitlines()
    assert b'{"a":1}' in lines  # the one-record entry's newline was JSON whitespace
    dead = await redis.xrange(KEYS.dead_letter)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert reasons == ["record is not a JSON object", "record is not valid JSON in UTF-8"]
    stats = get_statistics(redis_server.url)
    # Errors of a taken-apart bundle are recounted from the records themselves.
    assert stats["total_requests"] == 6 and stats["total_errors"] == 1
    assert stats["dead_letters"] == 2


async def test_a_bundle_delivered_too_often_is_dead_lettered_whole_and_counted_in_records(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    await redis.xadd(KEYS.stream, bundle("2026-01-02", "h", [record(i) for i in range(7)]))
    cfg = WorkerConfig(redis_url=redis_server.url, log_dir=str(tmp_path / "logs"), consumer="w1")
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    try:
        entries = await redis.xrange(KEYS.stream)
        await consumer.process(entries, dead_letter_reasons={entries[0][0]: "delivered 10 times"})
        await consumer._settle_ack()
    finally:
        await client.aclose()
    ((_, dead),) = await redis.xrange(KEYS.dead_letter)
    assert dead[FIELD_COUNT] == b"7" and dead[b"reason"] == b"delivered 10 times"
    assert get_statistics(redis_server.url)["dead_letters"] == 7


def test_rotation_splits_a_bundle_between_records(tmp_path: Path) -> None:
    lines = PartitionLines()
    recs = [record(i, pad=100) for i in range(30)]
    lines.add("2026-01-02", "h", b"\n".join(recs[:20]), 20)
    lines.add("2026-01-02", "h", b"\n".join(recs[20:]), 10)
    writer = PartitionWriter(tmp_path, "w", max_bytes=len(recs[0]) * 7, fsync=False)
    plan = writer.plan(lines)
    writer.write(plan)
    assert plan.records == 30 and plan.partitions == {("2026-01-02", "h"): 30}
    writer.close()
    files = sorted(tmp_path.rglob("*.jsonl"))
    assert len(files) >= 4
    out = [line for path in files for line in path.read_bytes().splitlines()]
    assert out == recs  # whole records, in order, none torn across files


def test_json_format_pretty_prints_each_record_of_a_bundle(tmp_path: Path) -> None:
    lines = PartitionLines()
    lines.add("2026-01-02", "h", b"\n".join([record(1), record(2)]), 2)
    writer = PartitionWriter(tmp_path, "w", log_format="json", fsync=False)
    writer.write(writer.plan(lines))
    writer.close()
    assert [r.request_id for r in load_logs(tmp_path)] == ["r1", "r2"]
