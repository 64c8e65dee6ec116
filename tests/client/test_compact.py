"""Compaction to Parquet: exactly the same records, swapped atomically, read with the live JSONL
and never twice."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from vllm_middleware import _compact as compact
from vllm_middleware import load_logs
from vllm_middleware._compact import compact_tree
from vllm_middleware.storage import PartitionWriter, RecordEntry

DAYS = ["2026-01-01", "2026-01-02"]


def record(i: int, day: str) -> dict[str, Any]:
    return {
        "timestamp": f"{day}T10:00:{i % 60:02d}.{i:06d}+00:00",
        "request_id": f"req_{day}_{i}",
        "model": f"m{i % 3}",
        "messages": [{"role": "user", "content": f'héllo \u0001 "q" \n {"x" * (i % 50)}'}],
        "response": {"choices": [{"message": {"content": "ok"}}], "model": "inner"},
        "latency_ms": i * 1.25,
        "ttft_ms": None if i % 2 else 3.5,
        "error": None if i % 5 else "boom",
        "status_code": 200 if i % 5 else 500,
        "usage": {"prompt_tokens": 10, "completion_tokens": i},
        "metadata": {"nested": {"latency_ms": -1}},
    }


def make_tree(root: Path, per_day: int = 200) -> None:
    for owner in ("w1", "w2"):  # two workers' files in every partition, rotated small
        writer = PartitionWriter(root, owner, fsync=False, max_bytes=16 * 1024)
        for day in DAYS:
            for i in range(per_day):
                if (i % 2 == 0) == (owner == "w1"):
                    data = orjson.dumps(record(i, day))
                    writer.write_batch([RecordEntry(day, f"h{i % 2}", False, data)])
        writer.close()
    age(root)


def age(root: Path, seconds: float = 7200) -> None:
    old = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (old, old))


def everything(root: Path) -> list[bytes]:
    return sorted(orjson.dumps(dict(r), option=orjson.OPT_SORT_KEYS) for r in load_logs(root))


def test_compaction_keeps_exactly_the_same_records(tmp_path: Path) -> None:
    make_tree(tmp_path)
    # A gzip file and a torn tail, as readers meet them.
    extra = tmp_path / "date=2026-01-01" / "host=h0" / "old-000001.jsonl.gz"
    with gzip.open(extra, "wb") as handle:
        handle.write(orjson.dumps(record(999, "2026-01-01")) + b"\n")
    torn = next((tmp_path / "date=2026-01-02" / "host=h1").glob("*.jsonl"))
    with open(torn, "ab") as handle:
        handle.write(b'{"request_id": "torn", "mod')
    age(tmp_path)
    before = everything(tmp_path)
    assert len(before) == 401
    result = compact_tree(tmp_path, min_age_s=3600)
    assert result.errors == [] and len(result.compacted) == 4
    assert result.records == 401 and result.dropped_lines == 1
    assert everything(tmp_path) == before
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert leftovers == [] and not list(tmp_path.rglob(".compact-*"))
    # Typed columns for queries, hive partitions from the path, microsecond timestamps.
    rows = duckdb.sql(
        f'SELECT date, host, model, latency_ms, "timestamp", is_error, prompt_tokens '
        f"FROM read_parquet('{tmp_path}/*/*/*.parquet', hive_partitioning=true) "
        "WHERE request_id = 'req_2026-01-02_7'"
    ).fetchall()
    [(day, host, model, latency, stamp, is_error, prompt)] = rows
    assert (str(day), host, model, latency, is_error, prompt) == (
        "2026-01-02",
        "h1",
        "m1",
        8.75,
        False,
        10,
    )
    assert stamp == datetime(2026, 1, 2, 10, 0, 7, 7, tzinfo=UTC)


def test_late_records_are_read_beside_the_parquet_and_folded_in_later(tmp_path: Path) -> None:
    make_tree(tmp_path, per_day=50)
    assert compact_tree(tmp_path, min_age_s=3600).records == 100
    late = PartitionWriter(tmp_path, "w3", fsync=False)
    late.write_batch([RecordEntry("2026-01-01", "h0", False, orjson.dumps(record(77, "late")))])
    late.close()
    ids = [r.request_id for r in load_logs(tmp_path)]
    assert len(ids) == len(set(ids)) == 101
    # Not folded in while it is recent; folded in once it has aged.
    assert compact_tree(tmp_path, min_age_s=3600).compacted == []
    age(tmp_path)
    result = compact_tree(tmp_path, min_age_s=3600)
    assert result.compacted == ["date=2026-01-01/host=h0"] and result.records == 26
    [only] = (tmp_path / "date=2026-01-01" / "host=h0").iterdir()
    assert only.name.startswith("compacted-") and only.suffix == ".parquet"
    assert sorted(r.request_id for r in load_logs(tmp_path)) == sorted(ids)


def test_today_and_recent_partitions_are_left_alone(tmp_path: Path) -> None:
    today = datetime.now(UTC).date().isoformat()
    writer = PartitionWriter(tmp_path, "w1", fsync=False)
    writer.write_batch([RecordEntry(today, "h", False, orjson.dumps(record(1, today)))])
    writer.write_batch([RecordEntry(DAYS[0], "h", False, orjson.dumps(record(2, DAYS[0])))])
    writer.close()
    result = compact_tree(tmp_path, min_age_s=3600)
    assert result.compacted == [] and result.skipped == [
        f"date={DAYS[0]}/host=h: changed within 3600 s"
    ]
    age(tmp_path)
    assert compact_tree(tmp_path, min_age_s=3600).compacted == [f"date={DAYS[0]}/host=h"]
    assert compact_tree(tmp_path, day=today, min_age_s=3600).compacted == [f"date={today}/host=h"]
    assert len(load_logs(tmp_path)) == 2


def test_a_file_written_just_before_the_swap_undoes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, per_day=20)
    real_exchange = compact._exchange
    calls: list[Path] = []

    def exchange(a: Path, b: Path) -> None:
        if not calls:  # a writer starts a new file in the partition right before the swap
            (a / "w9-000001.jsonl").write_bytes(orjson.dumps(record(5, "writer")) + b"\n")
        calls.append(a)
        real_exchange(a, b)

    monkeypatch.setattr(compact, "_exchange", exchange)
    result = compact_tree(tmp_path, day=DAYS[0], min_age_s=3600)
    assert len(calls) == 3  # h0 swapped and swapped back, then h1 swapped
    assert result.compacted == [f"date={DAYS[0]}/host=h1"]
    assert result.skipped == [f"date={DAYS[0]}/host=h0: changed during compaction, kept as it was"]
    h0 = sorted(p.name for p in (tmp_path / f"date={DAYS[0]}" / "host=h0").iterdir())
    assert h0 and not any(name.endswith(".parquet") for name in h0) and "w9-000001.jsonl" in h0
    assert not list(tmp_path.rglob(".compact-*"))
    ids = [r.request_id for r in load_logs(tmp_path)]
    assert len(ids) == len(set(ids)) == 41


def test_compact_command(tmp_path: Path) -> None:
    make_tree(tmp_path, per_day=30)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_middleware._cli",
            "compact",
            "--log-dir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["records"] == 60 and len(report["compacted"]) == 4
    assert len(load_logs(tmp_path)) == 60
