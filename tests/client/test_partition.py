from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_middleware import ConfigurationError, load_logs
from vllm_middleware.storage import (
    PartitionWriter,
    RecordEntry,
    cut_back,
    partition_dir,
    sanitize_partition_value,
)


def entry(i: int, date: str = "2026-01-02", host: str = "h", size: int = 0) -> RecordEntry:
    record = {"request_id": f"r{i}", "error": None, "pad": "x" * size}
    return RecordEntry(date, host, False, orjson.dumps(record))


@pytest.mark.parametrize(
    "raw",
    ["../etc", "..", ".", "/abs/path", "a/../../b", "nul\x00byte", "x" * 500, "", ".hidden", "é🙂"],
)
def test_hostile_host_names_stay_one_safe_component(raw: str) -> None:
    cleaned = sanitize_partition_value(raw)
    assert cleaned and "/" not in cleaned and "\x00" not in cleaned
    assert not cleaned.startswith(".")
    assert len(cleaned) <= 64


def test_long_names_stay_distinct() -> None:
    assert sanitize_partition_value("a" * 100 + "1") != sanitize_partition_value("a" * 100 + "2")


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=200))
def test_partition_dir_never_escapes_log_dir(host: str) -> None:
    root = Path("/srv/logs")
    path = partition_dir(root, "2026-01-02", host)
    assert path.parent.parent == root
    assert os.path.normpath(path).startswith("/srv/logs/date=2026-01-02/host=")


@pytest.mark.parametrize("bad", ["2026-13-01", "../../x", "20260101", "2026-01-02/..", ""])
def test_invalid_dates_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        partition_dir(Path("/x"), bad, "h")


def test_batches_go_to_their_partitions(tmp_path: Path) -> None:
    writer = PartitionWriter(tmp_path, "w1")
    writer.write_batch(
        [entry(1, host="a"), entry(2, host="b"), entry(3, "2026-01-03", "a"), entry(4, host="a")]
    )
    writer.close()
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jsonl"))
    assert files == [
        "date=2026-01-02/host=a/w1-000001.jsonl",
        "date=2026-01-02/host=b/w1-000001.jsonl",
        "date=2026-01-03/host=a/w1-000001.jsonl",
    ]
    lines = (tmp_path / "date=2026-01-02/host=a/w1-000001.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["request_id"] for x in lines] == ["r1", "r4"]


def test_rotation_by_size_keeps_whole_lines(tmp_path: Path) -> None:
    writer = PartitionWriter(tmp_path, "w", max_bytes=10_000)
    for batch in range(10):
        writer.write_batch([entry(batch * 10 + i, size=900) for i in range(10)])
    writer.close()
    files = sorted(tmp_path.rglob("*.jsonl"))
    assert len(files) >= 10
    assert all(f.stat().st_size <= 10_000 for f in files)
    ids = [r.request_id for r in load_logs(tmp_path)]
    assert ids == [f"r{i}" for i in range(100)]


def test_a_record_larger_than_the_limit_gets_its_own_file(tmp_path: Path) -> None:
    writer = PartitionWriter(tmp_path, "w", max_bytes=1000)
    writer.write_batch([entry(1, size=10), entry(2, size=5000), entry(3, size=10)])
    writer.close()
    assert [r.request_id for r in load_logs(tmp_path)] == ["r1", "r2", "r3"]
    assert len(list(tmp_path.rglob("*.jsonl"))) == 3


def test_new_writer_never_appends_to_another_owners_file(tmp_path: Path) -> None:
    first = PartitionWriter(tmp_path, "same")
    first.write_batch([entry(1)])
    first.close()
    second = PartitionWriter(tmp_path, "same")
    second.write_batch([entry(2)])
    second.close()
    assert len(list(tmp_path.rglob("*.jsonl"))) == 2


def test_failed_write_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = PartitionWriter(tmp_path, "w")
    writer.write_batch([entry(1, host="a")])
    real_write = os.write
    calls = {"n": 0}

    def flaky(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the batch fails: the first must be undone
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky)
    with pytest.raises(OSError):
        writer.write_batch([entry(2, host="a"), entry(3, host="b")])
    monkeypatch.setattr(os, "write", real_write)
    writer.write_batch([entry(2, host="a"), entry(3, host="b")])  # the retry
    writer.close()
    ids = sorted(r.request_id for r in load_logs(tmp_path))
    assert ids == ["r1", "r2", "r3"]


def test_json_format_is_pretty_and_readable(tmp_path: Path) -> None:
    writer = PartitionWriter(tmp_path, "w", log_format="json")
    writer.write_batch([entry(1), entry(2)])
    writer.close()
    (path,) = tmp_path.rglob("*.json")
    text = path.read_text()
    assert text.count("\n}\n") == 2 and '  "request_id": "r1"' in text
    assert [r.request_id for r in load_logs(tmp_path)] == ["r1", "r2"]


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        PartitionWriter(tmp_path, "w", log_format="xml")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        PartitionWriter(tmp_path, "w", max_bytes=0)


def test_cut_back_removes_an_unfinished_batch_durably(tmp_path: Path) -> None:
    grown = tmp_path / "grown.jsonl"
    grown.write_bytes(b'{"a":1}\n{"torn"')
    assert cut_back(grown, 8) == 7 and grown.read_bytes() == b'{"a":1}\n'
    assert cut_back(grown, 8) == 0 and grown.read_bytes() == b'{"a":1}\n'  # already cut
    created = tmp_path / "created.jsonl"
    created.write_bytes(b'{"b":2}\n')
    assert cut_back(created, 0) == 8 and created.read_bytes() == b""  # kept: may be open
    assert cut_back(tmp_path / "missing.jsonl", 3) == 0
    assert cut_back(grown / "under-a-file.jsonl", 0) == 0
