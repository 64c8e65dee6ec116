from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import orjson
import pytest
from vllm_middleware import ConfigurationError, LogReadError, ReadStats, iter_logs, load_logs


def write_lines(path: Path, records: list[dict[str, object]], tail: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + tail)


def rec(i: int, day: str = "2025-10-21", **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "request_id": f"r{i}",
        "timestamp": f"{day}T10:00:00+00:00",
        "model": "m",
        "error": None,
        "latency_ms": float(i),
    }
    base.update(extra)
    return base


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for day, host, ids in [
        ("2025-10-20", "a", [1, 2]),
        ("2025-10-21", "a", [3]),
        ("2025-10-21", "b", [4]),
        ("2025-10-25", "b", [5]),
        ("2025-10-26", "a", [6]),
    ]:
        records = [rec(i, day, host=host) for i in ids]
        write_lines(tmp_path / f"date={day}" / f"host={host}" / "w-000001.jsonl", records)
    return tmp_path


def ids(records: object) -> list[str]:
    return [r.request_id for r in records]  # type: ignore[attr-defined]


def test_date_filters_in_both_spellings(tree: Path) -> None:
    assert ids(load_logs(tree)) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert ids(load_logs(tree, start_date="20251021", end_date="20251025")) == ["r3", "r4", "r5"]
    assert ids(load_logs(tree, start_date="2025-10-21", end_date="2025-10-21")) == ["r3", "r4"]
    assert ids(load_logs(tree, start_date="20251025")) == ["r5", "r6"]


def test_host_model_and_error_filters(tree: Path) -> None:
    write_lines(
        tree / "date=2025-10-21/host=a/w-000002.jsonl",
        [rec(7, error="HTTP 500"), rec(8, model="other")],
    )
    assert ids(iter_logs(tree, host="b")) == ["r4", "r5"]
    assert ids(iter_logs(tree, errors_only=True)) == ["r7"]
    assert ids(iter_logs(tree, model="other")) == ["r8"]


def test_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "date=2025-10-21/host=a/w-000001.jsonl"
    write_lines(path, [rec(1), rec(2)], tail=b'{"request_id": "r3", "tim')
    stats = ReadStats()
    assert ids(iter_logs(tmp_path, stats=stats)) == ["r1", "r2"]
    assert stats.torn_tails == 1 and stats.records == 2


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "date=2025-10-21/host=a/w-000001.jsonl"
    write_lines(path, [rec(1)], tail=orjson.dumps(rec(2)))
    assert ids(load_logs(tmp_path)) == ["r1", "r2"]


def test_bad_line_in_the_middle_is_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "date=2025-10-21/host=a/w-000001.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(orjson.dumps(rec(1)) + b"\nnot json\n" + orjson.dumps(rec(2)) + b"\n")
    stats = ReadStats()
    assert ids(iter_logs(tmp_path, stats=stats)) == ["r1", "r2"]
    assert stats.bad_lines == 1


def test_gzip_files_and_truncated_gzip(tmp_path: Path) -> None:
    body = b"".join(orjson.dumps(rec(i)) + b"\n" for i in range(100))
    good = tmp_path / "date=2025-10-21/host=a/old-000001.jsonl.gz"
    good.parent.mkdir(parents=True)
    good.write_bytes(gzip.compress(body))
    assert len(load_logs(tmp_path)) == 100
    cut = tmp_path / "date=2025-10-21/host=a/old-000002.jsonl.gz"
    cut.write_bytes(gzip.compress(body)[:-30])
    stats = ReadStats()
    records = list(iter_logs(tmp_path, stats=stats))
    assert len(records) >= 100 and stats.torn_tails == 1


def test_hidden_and_foreign_files_are_ignored(tree: Path) -> None:
    (tree / "date=2025-10-21/host=a/.inprogress.jsonl").write_text('{"request_id":"x"}\n')
    (tree / "date=2025-10-21/host=a/notes.txt").write_text("hello")
    assert "x" not in ids(load_logs(tree))


def test_flat_files_of_the_original_tool_are_read_and_date_filtered(tmp_path: Path) -> None:
    write_lines(tmp_path / "vllm_logs_20251020.jsonl", [rec(1, "2025-10-20"), rec(2, "2025-10-22")])
    assert ids(load_logs(tmp_path)) == ["r1", "r2"]
    assert ids(load_logs(tmp_path, start_date="20251021")) == ["r2"]


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        load_logs(tmp_path, start_date="21/10/2025")
    with pytest.raises(LogReadError):
        load_logs(tmp_path / "missing")


def test_iter_logs_memory_stays_flat(tmp_path: Path) -> None:
    pad = "x" * 1000
    path = tmp_path / "date=2025-10-21/host=a/w-000001.jsonl"
    write_lines(path, [rec(i, pad=pad) for i in range(30_000)])  # ~31 MB
    tracemalloc.start()
    count = 0
    for _ in iter_logs(tmp_path):
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 30_000
    assert peak < 24 * 1024 * 1024  # a few read chunks, never the whole file
