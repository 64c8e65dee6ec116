from __future__ import annotations

import contextlib
import gzip
import os
import threading
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from vllm_middleware import (
    ConfigurationError,
    LogReadError,
    ReadStats,
    get_statistics,
    iter_logs,
    load_logs,
)
from vllm_middleware._read_files import iter_documents


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


# -- issue 10 item 8: bad arguments say what is wrong ------------------------------------------
def test_a_date_given_as_an_int_is_a_clear_error(tree: Path) -> None:
    with pytest.raises(ValueError, match=r"start_date must be a str .* not int 20251021"):
        load_logs(tree, start_date=20251021)  # type: ignore[arg-type]


def test_start_after_end_is_an_error_not_an_empty_list(tree: Path) -> None:
    with pytest.raises(ValueError, match="start_date 2025-10-25 is after end_date 2025-10-21"):
        load_logs(tree, start_date="20251025", end_date="20251021")


def test_a_partition_folder_as_root_is_an_error(tree: Path) -> None:
    for folder in (tree / "date=2025-10-21", tree / "date=2025-10-21" / "host=a"):
        with pytest.raises(LogReadError, match="is a partition folder"):
            load_logs(folder)
    with pytest.raises(LogReadError, match="is not a directory"):
        load_logs(tree / "date=2025-10-21/host=a/w-000001.jsonl")


# -- issue 11 item 5: only regular files inside the tree, degrading gracefully ------------------
def _read_in_thread(root: Path, **kwargs: Any) -> tuple[list[str], ReadStats]:
    """load_logs on a thread: a read that blocks fails the test instead of hanging it."""
    stats = ReadStats()
    result: list[list[str]] = []
    thread = threading.Thread(
        target=lambda: result.append(ids(load_logs(root, stats=stats, **kwargs))), daemon=True
    )
    thread.start()
    thread.join(20)
    return (result[0] if result else ["<blocked>"]), stats


def test_a_fifo_named_like_a_log_file_does_not_block_the_reader(tree: Path) -> None:
    fifo = tree / "date=2025-10-21/host=a/x.jsonl"
    os.mkfifo(fifo)
    try:
        records, stats = _read_in_thread(tree)
    finally:
        # Unblock a reader stuck in open() (the code before the fix), so the test ends.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert records == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert stats.skipped_entries == 1
    # The file scan behind embedded statistics skips it too.
    assert get_statistics(log_dir=tree)["log_files_count"] == 5


def test_a_directory_named_like_a_log_file_is_skipped_and_counted(tree: Path) -> None:
    (tree / "date=2025-10-21/host=a/x.jsonl").mkdir()
    (tree / "y.jsonl").mkdir()  # in the flat (original tool's) layer too
    stats = ReadStats()
    assert ids(load_logs(tree, stats=stats)) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert stats.skipped_entries == 2


def test_symlinks_out_of_the_tree_are_not_followed_by_default(
    tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    write_lines(outside / "secret.jsonl", [rec(90)])
    write_lines(outside / "day" / "host=z" / "w.jsonl", [rec(91, "2025-10-23")])
    (tree / "date=2025-10-21/host=a/evil.jsonl").symlink_to(outside / "secret.jsonl")
    (tree / "date=2025-10-23").symlink_to(outside / "day")
    (tree / "date=2025-10-20/host=link").symlink_to(outside / "day" / "host=z")
    stats = ReadStats()
    assert ids(load_logs(tree, stats=stats)) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    assert stats.skipped_links == 3
    followed = ids(load_logs(tree, follow_symlinks=True))
    assert sorted(followed) == ["r1", "r2", "r3", "r4", "r5", "r6", "r90", "r91", "r91"]
    assert get_statistics(log_dir=tree)["total_requests"] == 6


def test_a_cut_gzip_file_keeps_every_complete_record(tmp_path: Path) -> None:
    body = b"".join(orjson.dumps(rec(i, pad=f"{i:08d}" * 40)) + b"\n" for i in range(843))
    packed = gzip.compress(body)
    cut = packed[: len(packed) * 2 // 3]
    path = tmp_path / "date=2025-10-21/host=a/old-000001.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(cut)
    inflated = zlib.decompressobj(31).decompress(cut)
    complete = inflated.count(b"\n")
    assert 0 < complete < 843
    stats = ReadStats()
    records = ids(iter_logs(tmp_path, stats=stats))
    assert records == [f"r{i}" for i in range(complete)]
    assert stats.torn_tails == 1 and stats.damaged_files == 0 and stats.bad_lines == 0


def test_a_gz_file_that_is_not_gzip_is_counted_as_damaged(tmp_path: Path) -> None:
    write_lines(tmp_path / "date=2025-10-21/host=a/fake.jsonl.gz", [rec(1)])
    write_lines(tmp_path / "date=2025-10-21/host=a/w.jsonl", [rec(2)])
    stats = ReadStats()
    assert ids(load_logs(tmp_path, stats=stats)) == ["r2"]
    assert stats.damaged_files == 1 and stats.torn_tails == 0


def test_concatenated_gzip_members_are_all_read(tmp_path: Path) -> None:
    path = tmp_path / "date=2025-10-21/host=a/old.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(orjson.dumps(rec(1)) + b"\n") + gzip.compress(b""))
    with path.open("ab") as handle:
        handle.write(gzip.compress(orjson.dumps(rec(2)) + b"\n"))
    stats = ReadStats()
    assert ids(load_logs(tmp_path, stats=stats)) == ["r1", "r2"]
    assert stats.torn_tails == 0 and stats.damaged_files == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_lines_over_max_line_bytes_are_skipped_and_counted(tmp_path: Path, suffix: str) -> None:
    big = rec(2, pad="y" * 9_000_000)  # longer than a read chunk: split across reads
    if suffix == ".json":
        body = b"".join(
            orjson.dumps(r, option=orjson.OPT_INDENT_2) + b"\n" for r in (rec(1), big, rec(3))
        )
    else:
        body = b"".join(orjson.dumps(r) + b"\n" for r in (rec(1), big, rec(3)))
    path = tmp_path / f"date=2025-10-21/host=a/w{suffix}"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)
    stats = ReadStats()
    assert ids(load_logs(tmp_path, stats=stats, max_line_bytes=1_000_000)) == ["r1", "r3"]
    assert stats.long_lines == 1 and stats.bad_lines == 0 and stats.torn_tails == 0
    assert ids(load_logs(tmp_path)) == ["r1", "r2", "r3"]  # under the default cap


def test_a_long_line_costs_memory_linear_in_its_length(tmp_path: Path) -> None:
    """The file layer's own memory (orjson's parse of the line, which the reader does not
    control, is left out): the line grows in one buffer handed on as it is, about its size,
    never a growing copy per read chunk (three times its size, and quadratic time, before)."""
    size = 40_000_000  # ten read chunks
    path = tmp_path / "date=2025-10-21/host=a/w.jsonl"
    write_lines(path, [rec(1, pad="z" * size), rec(2)])
    tracemalloc.start()
    lengths = [
        len(doc)
        for doc in iter_documents(
            path, follow_symlinks=False, max_line_bytes=None, stats=ReadStats()
        )
    ]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(lengths) == 2 and lengths[0] > size
    assert peak < 1.5 * size + 8 * 1024 * 1024, peak
