"""Compression of closed files in place: same records, atomic, crash-safe, every reader reads
the compressed tree (and an interrupted compression's pair once)."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from vllm_middleware import ReadStats, load_logs
from vllm_middleware._compress import compress_tree
from vllm_middleware._crash import CRASH_EXIT
from vllm_middleware._read_files import iter_documents
from vllm_middleware._reader import iter_log_files
from vllm_middleware.storage import PartitionWriter, RecordEntry

DAYS = ["2026-01-01", "2026-01-02"]


def make_tree(root: Path, per_day: int = 120, log_format: str = "jsonl") -> None:
    writer = PartitionWriter(root, "w1", fsync=False, max_bytes=4 * 1024, log_format=log_format)  # type: ignore[arg-type]
    for day in DAYS:
        for i in range(per_day):
            data = orjson.dumps({"request_id": f"req_{day}_{i}", "model": "m", "pad": "x" * i})
            writer.write_batch([RecordEntry(day, f"h{i % 2}", False, data)])
    writer.close()
    age(root)


def age(root: Path, seconds: float = 7200) -> None:
    old = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (old, old), follow_symlinks=False)


def ids(root: Path) -> list[str]:
    return sorted(r["request_id"] for r in load_logs(root))


def names(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if not p.name.startswith("."))


def test_compresses_closed_files_in_place_keeping_records_modes_and_mtimes(
    tmp_path: Path,
) -> None:
    make_tree(tmp_path)
    before = ids(tmp_path)
    plain = names(tmp_path, "*.jsonl")
    assert len(plain) > 4
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in plain}
    mtimes = {p: p.stat().st_mtime_ns for p in plain}
    sizes = sum(p.stat().st_size for p in plain)

    result = compress_tree(tmp_path)

    assert result.errors == []
    assert result.compressed == len(plain)
    assert result.bytes_before == sizes and 0 < result.bytes_after < sizes
    assert names(tmp_path, "*.jsonl") == []
    assert list(tmp_path.rglob(".*")) == []  # no temp file left
    for path in plain:
        packed = path.with_name(path.name + ".gz")
        assert stat.S_IMODE(packed.stat().st_mode) == modes[path] == 0o640
        assert packed.stat().st_mtime_ns == mtimes[path]
    assert ids(tmp_path) == before
    assert compress_tree(tmp_path).compressed == 0  # nothing left to do


def test_pretty_json_files_are_compressed_and_read(tmp_path: Path) -> None:
    make_tree(tmp_path, per_day=30, log_format="json")
    before = ids(tmp_path)
    assert compress_tree(tmp_path).compressed == len(names(tmp_path, "*.json.gz"))
    assert names(tmp_path, "*.json") == []
    assert ids(tmp_path) == before


def test_files_changed_recently_are_left_alone(tmp_path: Path) -> None:
    make_tree(tmp_path)
    live = names(tmp_path, "*.jsonl")[-1]
    os.utime(live)  # written just now: a writer may still hold it open
    result = compress_tree(tmp_path, min_age_s=3600)
    assert result.skipped_recent == 1
    assert live.exists() and not live.with_name(live.name + ".gz").exists()
    assert names(tmp_path, "*.jsonl") == [live]


def test_only_the_given_day(tmp_path: Path) -> None:
    make_tree(tmp_path)
    compress_tree(tmp_path, day=DAYS[0])
    assert all(DAYS[1] in str(p) for p in names(tmp_path, "*.jsonl"))
    assert all(DAYS[0] in str(p) for p in names(tmp_path, "*.jsonl.gz"))


def test_symbolic_links_are_never_followed_nor_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    make_tree(root, per_day=10)
    outside = tmp_path / "secret.jsonl"
    outside.write_bytes(b'{"request_id": "outside"}\n')
    part = next(root.glob("date=*/host=*"))
    (part / "link.jsonl").symlink_to(outside)
    (root / "date=2026-01-03").symlink_to(part.parent, target_is_directory=True)
    age(root)
    result = compress_tree(root)
    assert result.errors == []
    assert (part / "link.jsonl").is_symlink()
    assert not (part / "link.jsonl.gz").exists()
    assert outside.read_bytes() == b'{"request_id": "outside"}\n'


def pair_up(root: Path) -> list[Path]:
    """Every plain file with its compressed copy beside it (an interrupted compression)."""
    plain = names(root, "*.jsonl")
    for path in plain:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as out:
            out.write(path.read_bytes())
    return plain


def test_readers_read_a_pair_once(tmp_path: Path) -> None:
    make_tree(tmp_path)
    before = ids(tmp_path)
    pair_up(tmp_path)
    stats = ReadStats()
    assert sorted(r["request_id"] for r in load_logs(tmp_path, stats=stats)) == before
    assert stats.files == len(names(tmp_path, "*.jsonl"))


def test_duckdb_query_reads_a_pair_once(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    from vllm_middleware._query import connect

    make_tree(tmp_path)
    before = ids(tmp_path)
    # some files compressed, some paired, some plain
    plain = names(tmp_path, "*.jsonl")
    compress_tree(tmp_path, day=DAYS[0])
    pair_up(tmp_path)
    (plain[-1].with_name(plain[-1].name + ".gz")).unlink()
    con = connect(tmp_path)
    got = sorted(row[0] for row in con.execute("SELECT request_id FROM logs").fetchall())
    assert got == before


def test_compaction_reads_a_pair_once(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    from vllm_middleware._compact import compact_tree

    make_tree(tmp_path)
    before = ids(tmp_path)
    pair_up(tmp_path)
    result = compact_tree(tmp_path, min_age_s=0)
    assert result.errors == []
    assert result.records == len(before)
    assert ids(tmp_path) == before


def test_a_listed_file_compressed_before_it_is_opened_is_read_from_the_gz(
    tmp_path: Path,
) -> None:
    make_tree(tmp_path)
    before = ids(tmp_path)
    listed = list(iter_log_files(tmp_path))  # the reader lists ...
    compress_tree(tmp_path)  # ... compression runs ...
    stats = ReadStats()
    got = [  # ... and the reader opens what it listed
        orjson.loads(doc)["request_id"]
        for path in listed
        for doc in iter_documents(path, follow_symlinks=False, max_line_bytes=None, stats=stats)
    ]
    assert sorted(got) == before


def test_the_next_run_finishes_a_pair_and_refuses_one_that_differs(tmp_path: Path) -> None:
    make_tree(tmp_path)
    before = ids(tmp_path)
    plain = pair_up(tmp_path)
    odd = plain[0].with_name(plain[0].name + ".gz")
    with gzip.open(odd, "wb") as out:
        out.write(b'{"request_id": "not the same"}\n')
    result = compress_tree(tmp_path)
    assert result.finished_pairs == len(plain) - 1
    assert len(result.errors) == 1 and "does not hold" in result.errors[0]
    assert plain[0].exists() and odd.exists()  # both kept; the plain one is read
    assert ids(tmp_path) == before


def test_writers_never_reuse_a_compressed_name(tmp_path: Path) -> None:
    writer = PartitionWriter(tmp_path, "w1", fsync=False)
    writer.write_batch([RecordEntry(DAYS[0], "h", False, b'{"request_id": "a"}')])
    writer.close()
    age(tmp_path)
    compress_tree(tmp_path)
    writer = PartitionWriter(tmp_path, "w1", fsync=False)  # a restarted worker
    writer.write_batch([RecordEntry(DAYS[0], "h", False, b'{"request_id": "b"}')])
    writer.close()
    assert ids(tmp_path) == ["a", "b"]


@pytest.mark.parametrize("point", ["compress-before-rename", "compress-after-rename"])
@pytest.mark.parametrize("nth", [1, 3])
def test_a_crash_at_any_step_leaves_every_record_readable_once(
    tmp_path: Path, point: str, nth: int
) -> None:
    make_tree(tmp_path)
    before = ids(tmp_path)
    plain = names(tmp_path, "*.jsonl")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    environment["VLLM_MW_CRASH_AT"] = f"{point}:{nth}"
    run = subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", "compress", "--log-dir", str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == CRASH_EXIT, run.stderr
    temps = list(tmp_path.rglob(".*.tmp"))
    pairs = [p for p in names(tmp_path, "*.jsonl") if p.with_name(p.name + ".gz").exists()]
    if point == "compress-before-rename":
        assert len(temps) == 1 and pairs == []
    else:
        assert temps == [] and len(pairs) == 1
    assert ids(tmp_path) == before  # what a reader sees right after the crash

    result = compress_tree(tmp_path, min_age_s=0)  # the crashed run's temp file is stale
    assert result.errors == []
    assert result.finished_pairs == len(pairs)
    assert result.stale_temps_removed == len(temps)
    assert names(tmp_path, "*.jsonl") == [] and list(tmp_path.rglob(".*")) == []
    assert len(names(tmp_path, "*.jsonl.gz")) == len(plain)
    assert ids(tmp_path) == before


def test_cli_compress(tmp_path: Path) -> None:
    make_tree(tmp_path)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    environment["VLLM_MW_LOG_DIR"] = str(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", "compress", "--json", "--level", "1"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["compressed"] == len(names(tmp_path, "*.jsonl.gz")) > 0
    assert report["errors"] == []


def test_tail_shows_the_same_history_from_a_compressed_tree(tmp_path: Path) -> None:
    from vllm_middleware._record_view import RecordFilter
    from vllm_middleware._tail import last_records

    make_tree(tmp_path)
    before = [r["request_id"] for r in last_records(tmp_path, RecordFilter(), 50)]
    pair_up(tmp_path)  # an interrupted compression: read once
    assert [r["request_id"] for r in last_records(tmp_path, RecordFilter(), 50)] == before
    compress_tree(tmp_path)
    assert names(tmp_path, "*.jsonl") == []
    assert [r["request_id"] for r in last_records(tmp_path, RecordFilter(), 50)] == before


def test_the_embedded_writer_never_appends_to_a_file_idle_long_enough_to_be_compressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_middleware._partition import PartitionLines
    from vllm_middleware._sinks import _writer_main as writer_main

    monkeypatch.setattr(writer_main, "_FILE_IDLE_S", 0.2)
    frames = []
    for seq, rid in enumerate(("a", "b")):
        lines = PartitionLines()
        lines.add(DAYS[0], "h", orjson.dumps({"request_id": rid}))
        frames.append(writer_main.frame(writer_main.BATCH, seq, writer_main.encode_batch(lines)))
    replies_r, replies_w = os.pipe()
    writer = PartitionWriter(tmp_path, "app", fsync=False)
    try:
        writer_main._serve(io.BytesIO(frames[0]), replies_w, writer, None)  # a batch, written
        time.sleep(0.3)
        age(tmp_path)
        assert compress_tree(tmp_path).compressed == 1  # idle long enough: compressed
        writer_main._serve(io.BytesIO(frames[1]), replies_w, writer, None)  # a later batch
    finally:
        writer.close()
        os.close(replies_w)
        os.close(replies_r)
    assert ids(tmp_path) == ["a", "b"]  # "b" went to a new file, not to the removed inode
