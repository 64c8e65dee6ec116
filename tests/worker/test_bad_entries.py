"""Entries from old, buggy or foreign producers (issue 11, item 4): every line that reaches a
file is one JSON object in valid UTF-8; counters and dead letters stay bounded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from vllm_middleware import ConfigurationError, VLLMMiddleware, get_statistics, iter_log_files
from vllm_middleware._keys import (
    FIELD_COUNT,
    FIELD_DATE,
    FIELD_ERROR,
    FIELD_HOST,
    FIELD_RECORD,
)
from vllm_middleware._sinks._redis_sink import _SHIP_BATCH, pack_batch
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess

from ..conftest import drain
from .test_worker import config

KEYS = StreamKeys()
DATE, HOST = b"2026-01-02", b"h"


def good(i: int) -> bytes:
    return orjson.dumps({"request_id": f"r{i}", "error": None})


def lines_in_files(log_dir: Path) -> list[bytes]:
    found: list[bytes] = []
    for path in iter_log_files(log_dir):
        data = path.read_bytes()
        assert data.endswith(b"\n")
        found += data.split(b"\n")[:-1]
    return found


def assert_every_line_is_a_json_object(log_dir: Path) -> list[str]:
    ids = []
    for line in lines_in_files(log_dir):
        parsed = json.loads(line.decode("utf-8"))  # strict: UTF-8, standard JSON
        assert isinstance(parsed, dict), line
        ids.append(parsed.get("request_id", ""))
    return sorted(ids)


async def test_raw_entries_that_are_not_json_objects_never_reach_the_files(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """Formerly written as they were: `{this is not json}`, invalid UTF-8, a bundle with a
    broken line between braces - and then DuckDB's `read_json` failed on the whole tree."""
    raw = {FIELD_DATE: DATE, FIELD_HOST: HOST, FIELD_ERROR: b"0"}
    # The field layout of this client without a checksum (an older client, a raw XADD).
    await redis.xadd(KEYS.stream, {**raw, FIELD_COUNT: b"1", FIELD_RECORD: b"{this is not json}"})
    await redis.xadd(KEYS.stream, {**raw, FIELD_COUNT: b"1", FIELD_RECORD: b'{"a": "\xff\xfe"}'})
    await redis.xadd(KEYS.stream, {**raw, FIELD_RECORD: b"{\x00}"})
    await redis.xadd(KEYS.stream, {**raw, FIELD_COUNT: b"1", FIELD_RECORD: b'{"a":\r1}'})
    bundle = b"\n".join([good(1), b"{not: json}", good(2)])
    await redis.xadd(KEYS.stream, {**raw, FIELD_COUNT: b"3", FIELD_RECORD: bundle})
    # A bundle of this client's packing, altered after the checksum was computed.
    packed = pack_batch([RecordEntry("2026-01-02", "h", False, good(i)) for i in (3, 4)], 0, 0)
    script = redis.register_script(_SHIP_BATCH)
    await script(keys=[KEYS.stream, "m", KEYS.stats], args=packed)
    entry_id, fields = (await redis.xrange(KEYS.stream))[-1]
    await redis.xdel(KEYS.stream, entry_id)
    altered = fields[FIELD_RECORD].replace(b'"r4"', b'"r4\\')  # `{...}` still around each line
    await redis.xadd(KEYS.stream, {**fields, FIELD_RECORD: altered})
    # The same packing, intact: written as it is.
    packed = pack_batch([RecordEntry("2026-01-02", "h", False, good(i)) for i in (5, 6)], 0, 0)
    await script(keys=[KEYS.stream, "m2", KEYS.stats], args=packed)
    consumer = await drain(config(redis_server, tmp_path, "w"))
    assert assert_every_line_is_a_json_object(tmp_path) == ["", "r1", "r2", "r3", "r5", "r6"]
    assert b'{"a":1}' in lines_in_files(tmp_path)  # JSON whitespace `\r` re-encoded away
    dead = await redis.xrange(KEYS.dead_letter)
    assert consumer.status.dead_letters == len(dead) == 5
    assert all(b"JSON" in fields[b"reason"] for _, fields in dead)


async def test_a_huge_count_does_not_overflow_a_counter(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """`n` = 10**30 on an entry dead-lettered whole: its count formerly went to HINCRBY, which
    failed ("out of range") on every attempt: the worker never acknowledged again."""
    huge = b"1" + b"0" * 30
    await redis.xadd(
        KEYS.stream,
        {FIELD_DATE: b"../etc", FIELD_HOST: HOST, FIELD_ERROR: b"0", FIELD_COUNT: huge,
         FIELD_RECORD: good(1)},
    )  # fmt: skip
    await redis.xadd(KEYS.stream, {FIELD_DATE: DATE, FIELD_HOST: HOST, FIELD_RECORD: good(2)})
    await drain(config(redis_server, tmp_path, "w"), timeout=20)
    stats = get_statistics(redis_server.url)
    assert stats["dead_letters"] == 1 and stats["total_requests"] == 1
    assert stats["damaged_fields"] == {}


async def test_a_dead_letter_keeps_a_bounded_prefix_of_a_huge_entry(
    redis: aioredis.Redis, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """A 100 MB entry was copied whole into its dead letter (worker peak 437 MB)."""
    big = b'{"p": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    await redis.xadd(KEYS.stream, {FIELD_DATE: DATE, FIELD_HOST: HOST, FIELD_RECORD: big})
    await redis.xadd(
        KEYS.stream, {FIELD_DATE: DATE, FIELD_HOST: HOST, FIELD_COUNT: b"2", FIELD_RECORD: big}
    )
    await drain(config(redis_server, tmp_path, "w", max_record_bytes=1024 * 1024))
    dead = await redis.xrange(KEYS.dead_letter)
    assert len(dead) == 2
    for _, fields in dead:
        assert len(fields[FIELD_RECORD]) <= 64 * 1024 and big.startswith(fields[FIELD_RECORD])
        assert int(fields[b"cut:" + FIELD_RECORD]) == len(big)
        assert b"exceeds max_record_bytes" in fields[b"reason"]
    assert list(iter_log_files(tmp_path)) == []


@pytest.mark.parametrize(
    "host",
    ["", "a\x00b", "x" * 1025, "bad\udc80surrogate"],
    ids=["empty", "nul", "long", "surrogate"],
)
def test_a_host_that_cannot_name_a_partition_is_refused_at_construction(host: str) -> None:
    from vllm_middleware._partition import check_host, host_problem

    assert host_problem(host) is not None
    with pytest.raises(ConfigurationError):
        check_host(host)
    if host:  # an empty host means "this machine's name"
        with pytest.raises(ConfigurationError):
            VLLMMiddleware(host=host, enable_file_logging=False)


def test_hosts_the_worker_accepts_are_accepted_by_the_client() -> None:
    from vllm_middleware._partition import MAX_HOST_LEN, check_host, host_problem

    for host in ("h", "app-1.example", "ü" * MAX_HOST_LEN, "../../etc"):
        assert host_problem(host) is None and check_host(host) == host
        client = VLLMMiddleware(host=host, enable_file_logging=False)
        asyncio.run(client.close())
