from __future__ import annotations

import multiprocessing
import re
from datetime import UTC, datetime

import orjson
import pytest
from vllm_middleware import LogRecord, new_request_id
from vllm_middleware._record import encode_record

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
