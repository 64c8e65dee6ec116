"""The embedded writer process: records land exactly once through its starts, deaths and
failures, and the app falls back to a writer thread when no process can start."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from vllm_middleware import ConfigurationError, ReadStats, iter_logs
from vllm_middleware._partition import PartitionLines
from vllm_middleware._record import RecordEntry
from vllm_middleware._sinks._destination import file_shipper
from vllm_middleware._sinks._shipping import Shipper, ShippingSettings
from vllm_middleware._sinks._writer_main import decode_batch, encode_batch

DATE = "2026-11-27"


def entries(start: int, count: int, host: str = "app-1", pad: int = 0) -> list[RecordEntry]:
    return [
        RecordEntry(
            DATE,
            host,
            i % 7 == 0,
            orjson.dumps(
                {"request_id": f"req_{i:06d}", "timestamp": f"{DATE}T00:00:00", "pad": "x" * pad}
            ),
        )
        for i in range(start, start + count)
    ]


def make_sink(
    log_dir: Path, writer: str = "auto", backoff: tuple[float, float] = (0.01, 0.05)
) -> Shipper:
    settings = ShippingSettings(
        batch_size=50, flush_interval=0.01, retry_backoff=backoff, embedded_writer=writer
    )
    return file_shipper(log_dir, max_bytes=1 << 20, shipping=settings)


async def ship(sink: Shipper, batch: list[RecordEntry], timeout: float = 20) -> None:
    for entry in batch:
        sink.submit(entry)
    assert await sink.wait_durable(timeout)


def ids_in(log_dir: Path) -> list[str]:
    stats = ReadStats()
    ids = [record["request_id"] for record in iter_logs(log_dir, stats=stats)]
    assert stats.torn_tails == 0 and stats.bad_lines == 0
    return ids


def assert_exactly(log_dir: Path, count: int) -> None:
    ids = ids_in(log_dir)
    assert len(ids) == count, f"{len(ids)} records, {len(set(ids))} distinct, {count} expected"
    assert sorted(ids) == [f"req_{i:06d}" for i in range(count)]


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # a zombie of ours counts as gone
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        time.sleep(0.02)
    return False


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no writer process on Windows")


def test_batch_frames_round_trip() -> None:
    lines = PartitionLines.from_entries(entries(0, 5) + entries(5, 3, host="héllo/../x"))
    lines.add("2026-11-28", "app-1", b'{"a":1}\n{"a":2}', records=2)
    back = decode_batch(encode_batch(lines))
    assert back.records == lines.records
    assert {key: b"\n".join(chunks) for key, chunks in back.chunks.items()} == {
        key: b"\n".join(chunks) for key, chunks in lines.chunks.items()
    }
    with pytest.raises(ValueError, match="inside a section"):
        decode_batch(encode_batch(lines)[:-3])


async def test_records_go_through_a_writer_process(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    await ship(sink, entries(0, 120))
    assert sink.sink.process is not None
    pid = sink.sink.process.pid
    assert pid is not None and pid != os.getpid()
    await sink.aclose()
    assert gone(pid), "the writer process outlived close"
    assert_exactly(tmp_path, 120)
    assert sink.sink.process.starts == 1 and sink.counters.failed_batches == 0


async def test_a_killed_writer_is_replaced(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    await ship(sink, entries(0, 60))
    assert sink.sink.process is not None and sink.sink.process.pid is not None
    os.kill(sink.sink.process.pid, signal.SIGKILL)
    await ship(sink, entries(60, 60))
    await sink.aclose()
    assert sink.sink.process.starts == 2
    assert_exactly(tmp_path, 120)


async def test_a_writer_killed_while_the_pipe_is_full(tmp_path: Path) -> None:
    """A batch larger than the pipe waits for room; the writer's death must end that wait
    (not hang the shipper), and the batch goes whole to the next writer."""
    sink = make_sink(tmp_path)
    await ship(sink, entries(0, 10))
    assert sink.sink.process is not None and sink.sink.process.pid is not None
    pid = sink.sink.process.pid
    os.kill(pid, signal.SIGSTOP)
    for entry in entries(10, 50, pad=64 * 1024):  # ~3 MiB: more than the pipe holds
        sink.submit(entry)
    await asyncio.sleep(0.3)
    spawned = sink.sink.process._spawned
    assert spawned is not None and spawned.room is not None, "the send is not waiting for room"
    os.kill(pid, signal.SIGKILL)
    assert await sink.wait_durable(20)
    await sink.aclose()
    assert sink.sink.process.starts == 2
    assert_exactly(tmp_path, 60)


@pytest.mark.parametrize("die_after", [1, 2], ids=["new-file", "appended"])
async def test_a_writer_dying_between_write_and_done_is_undone(
    tmp_path: Path, die_after: int
) -> None:
    """The dead writer wrote the batch but never said so: the next one cuts it back before the
    batch is written again, whether the batch had made a new file or grown an old one."""
    sink = make_sink(tmp_path)
    assert sink.sink.process is not None
    sink.sink.process.fault = f"exit-after-write:{die_after}"
    for first in range(0, 150, 50):
        await ship(sink, entries(first, 50))
    await sink.aclose()
    assert sink.sink.process.starts == 2
    assert sink.counters.failed_batches == 1
    assert "WriterProcessError" in (sink.counters.last_error or "")
    assert_exactly(tmp_path, 150)
    files = list(tmp_path.rglob("*.jsonl"))
    assert all(path.stat().st_size > 0 for path in files)


async def test_closing_before_a_successful_retry_still_cuts_the_dead_writers_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer died after writing a batch, and no new one starts before the app closes: the
    batch is counted as dropped, so it must not be left in the files either."""
    sink = make_sink(tmp_path)
    assert sink.sink.process is not None
    sink.sink.process.fault = "exit-after-write:1"
    for entry in entries(0, 50):
        sink.submit(entry)
    deadline = time.monotonic() + 10
    while sink.sink.process._spawned is None:
        assert time.monotonic() < deadline, "the writer was not started"
        await asyncio.sleep(0.001)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # no replacement can start
    while not sink.counters.failed_batches:
        assert time.monotonic() < deadline, "the writer did not die"
        await asyncio.sleep(0.01)
    await sink.aclose(timeout=0.5)
    assert sink.counters.dropped == 50
    assert ids_in(tmp_path) == []
    assert not list(tmp_path.rglob("*.jsonl")), "the dead writer's new file was left behind"


async def test_close_cuts_nothing_under_a_writer_still_writing(tmp_path: Path) -> None:
    """Close gives up on a writer stuck in the disk; the batch it is writing is left to it,
    whole: cutting its files back then would lose the records it writes next."""
    sink = make_sink(tmp_path)
    assert sink.sink.process is not None
    sink.sink.process.fault = "stall-after-write:1.5"
    sink.sink.process.close_timeout = 0.2
    for entry in entries(0, 50):
        sink.submit(entry)
    deadline = time.monotonic() + 10
    while sink.sink.process._spawned is None or not sink.sink.process._spawned.intents:
        assert time.monotonic() < deadline, "the writer never planned the batch"
        await asyncio.sleep(0.01)
    pid = sink.sink.process.pid
    assert pid is not None
    await sink.aclose(timeout=0.3)
    assert sink.counters.dropped == 50  # given up on, and counted
    assert gone(pid), "the stalled writer did not finish and exit"
    assert_exactly(tmp_path, 50)  # ... yet it landed whole: nothing was cut under it


async def test_a_failed_write_is_retried_and_lands_once(tmp_path: Path) -> None:
    blocker = tmp_path / f"date={DATE}"
    blocker.write_text("not a directory")  # the partition cannot be made
    sink = make_sink(tmp_path)
    for entry in entries(0, 80):
        sink.submit(entry)
    deadline = time.monotonic() + 10
    while sink.counters.failed_batches < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert sink.counters.failed_batches >= 3
    assert "WriterProcessError" in (sink.counters.last_error or "")
    assert sink.sink.process is not None and sink.sink.process.starts == 1  # failing is not dying
    blocker.unlink()
    assert await sink.wait_durable(20)
    await sink.aclose()
    assert_exactly(tmp_path, 80)


@pytest.mark.parametrize("executable", ["/nonexistent/python3", "/bin/false"])
async def test_auto_falls_back_to_a_thread(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    executable: str,
) -> None:
    monkeypatch.setattr(sys, "executable", executable)
    sink = make_sink(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vllm_middleware"):
        await ship(sink, entries(0, 70))
    await sink.aclose()
    assert sink.sink.process is None
    assert "writing from a thread instead" in caplog.text
    assert_exactly(tmp_path, 70)


async def test_process_mode_keeps_records_until_a_writer_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sys.executable
    monkeypatch.setattr(sys, "executable", "/bin/false")
    sink = make_sink(tmp_path, writer="process")
    for entry in entries(0, 40):
        sink.submit(entry)
    deadline = time.monotonic() + 10
    while sink.counters.failed_batches < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert sink.counters.failed_batches >= 2 and sink.buffered == 40
    assert ids_in(tmp_path) == []
    monkeypatch.setattr(sys, "executable", real)
    assert await sink.wait_durable(20)
    await sink.aclose()
    assert sink.sink.process is not None and sink.sink.process.starts == 1
    assert_exactly(tmp_path, 40)


async def test_the_writer_ignores_ctrl_c(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    await ship(sink, entries(0, 50))
    assert sink.sink.process is not None and sink.sink.process.pid is not None
    pid = sink.sink.process.pid
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await ship(sink, entries(50, 50))
    assert sink.sink.process.pid == pid
    await sink.aclose()
    assert_exactly(tmp_path, 100)


def test_the_writer_exits_when_the_app_dies(tmp_path: Path) -> None:
    app = textwrap.dedent(
        f"""
        import asyncio, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_writer_process import entries, make_sink, ship
        from pathlib import Path

        async def main():
            sink = make_sink(Path({str(tmp_path)!r}))
            await ship(sink, entries(0, 30))
            print(sink.sink.process.pid, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", app], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        writer_pid = int(proc.stdout.readline())
        proc.kill()
        proc.wait()
        assert gone(writer_pid), "the writer process outlived its app"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_exactly(tmp_path, 30)


def test_an_unknown_writer_kind_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="VLLM_MW_EMBEDDED_WRITER"):
        make_sink(tmp_path, writer="fork")


async def test_close_while_the_writer_starts_leaves_no_process(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    for entry in entries(0, 60):  # more than a batch: flushed at once
        sink.submit(entry)
    assert sink.sink.process is not None
    for _ in range(1000):
        if sink.sink.process._spawned is not None:
            break
        await asyncio.sleep(0.001)
    spawned = sink.sink.process._spawned
    assert spawned is not None and not spawned.ready.done(), "the writer was not starting"
    await sink.aclose(timeout=0.01)  # cancels the batch waiting for the writer to start
    assert gone(spawned.proc.pid), "a writer cut off while starting was left running"
    counters = sink.counters
    assert counters.shipped + counters.dropped == 60
    assert len(ids_in(tmp_path)) == counters.shipped


async def test_a_forked_child_lets_go_of_the_parents_writer(tmp_path: Path) -> None:
    sink = make_sink(tmp_path)
    await ship(sink, entries(0, 10))
    assert sink.sink.process is not None and sink.sink.process._spawned is not None
    owner = sink.sink.process.settings["owner"]
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        ok = sink.sink.process._spawned is None and sink.sink.process.settings["owner"] != owner
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)  # noqa: ASYNC222 - the child exits at once
    assert os.waitstatus_to_exitcode(status) == 0
    pid = sink.sink.process.pid
    await ship(sink, entries(10, 10))  # the parent's writer is untouched
    assert sink.sink.process.pid == pid
    await sink.aclose()
    assert gone(pid), "the writer did not see end of input: a forked copy kept its pipe open"
    assert_exactly(tmp_path, 20)


def test_a_sink_never_closed_saves_its_records_at_exit(tmp_path: Path) -> None:
    """An app that ends without closing its sink, records still in memory: at exit they are
    written, and the writer sees end of input and exits instead of living on."""
    app = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_writer_process import entries, ship
        from pathlib import Path
        from vllm_middleware._sinks._destination import file_shipper
        from vllm_middleware._sinks._shipping import ShippingSettings

        async def main():
            settings = ShippingSettings(batch_size=50, flush_interval=60)
            sink = file_shipper(Path({str(tmp_path)!r}), max_bytes=1 << 20, shipping=settings)
            await ship(sink, entries(0, 30))
            for entry in entries(30, 20):  # less than a batch, long before the flush timer
                sink.submit(entry)
            print(sink.sink.process.pid, flush=True)

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", app], stdout=subprocess.PIPE, timeout=60, check=True
    )
    writer_pid = int(proc.stdout.split()[0])
    assert gone(writer_pid), "an unclosed sink's writer kept running"
    assert_exactly(tmp_path, 50)


async def test_the_writer_keeps_the_log_dir_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative log_dir means the directory at construction, not wherever the app's cwd is
    when the writer process starts."""
    monkeypatch.chdir(tmp_path)
    sink = make_sink(Path("logs"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    await ship(sink, entries(0, 10))
    await sink.aclose()
    assert_exactly(tmp_path / "logs", 10)
