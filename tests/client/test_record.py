from __future__ import annotations

import multiprocessing
import random
import re
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from vllm_middleware import LogRecord, new_request_id
from vllm_middleware._record import encode_record, record_identity

ID_RE = re.compile(r"^req_\d{8}_\d{6}_[0-9a-f]{10}_\d+$")


def test_request_id_keeps_the_readable_prefix() -> None:
    now = datetime(2025, 10, 21, 10, 30, 45, tzinfo=UTC)
    rid = new_request_id(now)
    assert rid.startswith("req_20251021_103045_")
    assert ID_RE.match(rid)


def test_request_ids_are_unique_within_a_process() -> None:
    ids = {new_request_id() for _ in range(50_000)}
    assert len(ids) == 50_000


def _ids_in_child(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([new_request_id() for _ in range(1000)])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_request_ids_are_unique_across_processes(method: str) -> None:
    before = [new_request_id() for _ in range(1000)]
    ctx = multiprocessing.get_context(method)
    queue: multiprocessing.Queue[list[str]] = ctx.Queue()
    children = [ctx.Process(target=_ids_in_child, args=(queue,)) for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join()
    everything = before + [rid for batch in results for rid in batch]
    assert len(set(everything)) == len(everything) == 4000


def test_encode_record_never_fails_on_odd_values() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    data = encode_record({"a": {1, 2}, "b": b"\xff", "c": Odd(), "d": (1, 2), 5: "int key"})
    parsed = orjson.loads(data)
    assert sorted(parsed["a"]) == [1, 2]
    assert parsed["c"] == "<odd>"
    assert parsed["d"] == [1, 2]
    assert parsed["5"] == "int key"
    assert b"\n" not in data


def test_log_record_reads_like_the_original() -> None:
    record = LogRecord({"request_id": "r1", "latency_ms": 3.5, "error": None, "usage": {"a": 1}})
    assert record.request_id == "r1"
    assert record.latency_ms == 3.5
    assert record.error is None
    assert record.messages is None  # missing fields read as None
    assert record.future_field is None
    assert record["usage"] == {"a": 1}
    assert dict(record) == {"request_id": "r1", "latency_ms": 3.5, "error": None, "usage": {"a": 1}}
    assert record.parameters == {} and record.metadata == {}


def test_record_identity_matches_isoformat_over_random_instants() -> None:
    """The record's `timestamp` is the datetime itself, written by orjson: byte-identical to
    `isoformat()` (with and without microseconds), with the date and id prefix of its second."""
    rng = random.Random(7)
    start = datetime(2000, 1, 1, tzinfo=UTC)
    instants = [
        start + timedelta(microseconds=rng.randrange(40 * 365 * 86_400 * 10**6))
        for _ in range(20_000)
    ]
    instants += [moment.replace(microsecond=0) for moment in instants[:2_000]]
    instants += [
        datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    ]  # the cached second must roll over
    for now in instants:
        rid, date, stamp = record_identity(now)
        assert orjson.dumps({"timestamp": stamp}) == orjson.dumps({"timestamp": now.isoformat()})
        assert date == now.isoformat()[:10]
        assert rid.startswith(f"req_{now:%Y%m%d_%H%M%S}_") and ID_RE.match(rid)


def test_record_identity_outside_utc_keeps_the_local_text() -> None:
    now = datetime(2026, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    rid, date, stamp = record_identity(now)
    assert stamp == "2026-03-01T00:30:00+02:00" and date == "2026-03-01"
    assert rid.startswith("req_20260301_003000_")
    naive = datetime(2026, 3, 1, 12, 0, 0, 5)
    assert record_identity(naive)[2] == naive.isoformat()
