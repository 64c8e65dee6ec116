"""The partitioned sink: `log_dir/date=YYYY-MM-DD/host=NAME/<owner>-<n>.jsonl`.

One `PartitionWriter` per process owns its files (several writers appending to one file would
interleave lines). Writes are whole batches of whole lines: a batch is planned first (which file,
at which offset), then appended with one `write` per file and made durable with `fsync`. A
failed write truncates the file back to where the batch started, so a file never keeps a torn
or partial batch that a retry would then duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from ._crash import crash_point
from ._exceptions import ConfigurationError
from ._modes import LOG_MODES, FileModes, create_file, make_dirs
from ._record import RecordEntry

__all__ = [
    "MAX_HOST_LEN",
    "BatchPlan",
    "PartitionLines",
    "PartitionWriter",
    "WriteResult",
    "check_host",
    "cut_back",
    "fsync_dir",
    "host_problem",
    "is_valid_date",
    "partition_dir",
    "sanitize_partition_value",
]

LogFormat = Literal["jsonl", "json"]

_DATE_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_VALUE_LEN = 64
_SYNC_THREADS = 4
# Appends need the data and the new size durable, which is what fdatasync promises; fsync also
# forces a journal commit for the timestamps. macOS has no fdatasync.
_datasync = getattr(os, "fdatasync", os.fsync)


def is_valid_date(value: str) -> bool:
    return bool(_DATE_RE.match(value))


def cut_back(path: str | Path, offset: int) -> int:
    """Cut a file back to `offset` bytes, durably: what an unfinished batch wrote past the size
    its plan (the writer process's) or intent (a worker's) recorded. Returns the bytes removed.

    The file stays, even when the batch created it: a live writer may still hold it open (a
    worker undoing its own batch). A missing file was never written: 0. Only the owner's files
    are named, and nothing else appends to them, so no other data lies past the cut. Other
    errors raise `OSError`.
    """
    try:
        size = os.stat(path).st_size
        if size <= offset:
            return 0  # nothing to cut: not even opened for writing
        with open(path, "r+b") as handle:
            handle.truncate(offset)
            os.fsync(handle.fileno())
    except (FileNotFoundError, NotADirectoryError):
        return 0
    return size - offset


def sanitize_partition_value(value: str) -> str:
    """Make a partition value safe as one path component inside `log_dir`.

    Anything outside `[A-Za-z0-9._-]` becomes `_`; leading dots are replaced so the result is
    never `.`, `..` or hidden; long values are cut and suffixed with a hash so two long names
    stay distinct.
    """
    cleaned = _UNSAFE.sub("_", value)
    cleaned = re.sub(r"^\.+", lambda m: "_" * len(m.group()), cleaned)
    if len(cleaned) > _MAX_VALUE_LEN:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        cleaned = f"{cleaned[: _MAX_VALUE_LEN - 13]}-{digest}"
    return cleaned or "unknown"


MAX_HOST_LEN = 1024


def host_problem(host: str) -> str | None:
    """Why `host` cannot name a partition (both modes: the client's own host at construction,
    the worker's check of every entry), or None. What can, is `sanitize_partition_value`d."""
    if not host:
        return "the host is empty"
    if len(host) > MAX_HOST_LEN:
        return f"the host is longer than {MAX_HOST_LEN} characters"
    if "\x00" in host:
        return "the host holds a NUL character"
    try:
        host.encode("utf-8")
    except UnicodeEncodeError:
        return "the host is not valid Unicode (a lone surrogate)"
    return None


def check_host(host: str) -> str:
    """`host` if it can name a partition; raises `ConfigurationError` otherwise."""
    problem = host_problem(host)
    if problem is not None:
        raise ConfigurationError(f"invalid host {host[:80]!r}: {problem}")
    return host


def partition_dir(log_dir: Path, date: str, host: str) -> Path:
    if not is_valid_date(date):
        raise ConfigurationError(f"invalid partition date {date!r} (expected YYYY-MM-DD)")
    return log_dir / f"date={date}" / f"host={sanitize_partition_value(host)}"


@dataclass(frozen=True)
class _Part:
    key: tuple[str, str]  # (date, sanitized host)
    path: Path
    offset: int  # file size before this batch: where a rollback or a recovery truncates to
    data: bytes


@dataclass
class _OpenFile:
    path: Path
    fd: int
    size: int
    written_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchPlan:
    """Where each part of a batch goes: one `_Part` per file touched."""

    parts: list[_Part] = field(default_factory=list)
    records: int = 0
    errors: int = 0
    new_files: int = 0
    partitions: dict[tuple[str, str], int] = field(default_factory=dict)  # (date, host): records

    @property
    def nbytes(self) -> int:
        return sum(len(part.data) for part in self.parts)


class PartitionLines:
    """A batch grouped by raw (date, host), as `PartitionWriter.plan` takes it.

    A chunk is one record or several joined by newlines (a bundle, as the stream carries them),
    never with a trailing newline. The worker builds this directly from stream entries, so a
    bundle reaches the file in one piece; `from_entries` groups single records.
    """

    __slots__ = ("chunks", "errors", "records")

    def __init__(self) -> None:
        self.chunks: dict[tuple[str, str], list[bytes]] = {}
        self.records: dict[tuple[str, str], int] = {}
        self.errors = 0

    @classmethod
    def from_entries(cls, entries: Iterable[RecordEntry]) -> PartitionLines:
        lines = cls()
        chunks, records = lines.chunks, lines.records
        errors = 0
        for date, host, is_error, data in entries:
            key = (date, host)
            group = chunks.get(key)
            if group is None:
                group = chunks[key] = []
                records[key] = 0
            group.append(data)
            records[key] += 1
            errors += is_error
        lines.errors = errors
        return lines

    def add(self, date: str, host: str, data: bytes, records: int = 1, errors: int = 0) -> None:
        key = (date, host)
        group = self.chunks.get(key)
        if group is None:
            self.chunks[key] = [data]
            self.records[key] = records
        else:
            group.append(data)
            self.records[key] += records
        self.errors += errors

    @property
    def total(self) -> int:
        return sum(self.records.values())


@dataclass
class WriteResult:
    records: int
    errors: int
    nbytes: int
    new_files: int
    by_partition: dict[tuple[str, str], int]


class PartitionWriter:
    """Appends batches of encoded records to this owner's files, rotating them by size.

    Not thread-safe: call it from one thread at a time (the worker and the embedded sink each
    run it in one executor thread, off the event loop).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        owner: str,
        *,
        max_bytes: int = 100 * 1024 * 1024,
        log_format: LogFormat = "jsonl",
        fsync: bool = True,
        modes: FileModes = LOG_MODES,
    ) -> None:
        if log_format not in ("jsonl", "json"):
            raise ConfigurationError(f"log_format must be 'jsonl' or 'json', not {log_format!r}")
        if max_bytes <= 0:
            raise ConfigurationError("max_bytes must be positive")
        self.log_dir = Path(log_dir)
        self.owner = sanitize_partition_value(owner)
        self.max_bytes = max_bytes
        self.log_format = log_format
        self.fsync = fsync
        self.modes = modes
        self._suffix = ".jsonl" if log_format == "jsonl" else ".json"
        self._files: dict[tuple[str, str], _OpenFile] = {}
        self._sanitized: dict[str, str] = {}  # host -> sanitize_partition_value(host)
        self._sync_pool: ThreadPoolExecutor | None = None  # created for the first multi-file batch

    # -- planning ---------------------------------------------------------------------------
    def _encode_line(self, data: bytes) -> bytes:
        if self.log_format == "jsonl":
            return data + b"\n"
        # "json": each record pretty-printed, one after another; a record ends with a line
        # holding only "}", which is how readers find record boundaries and torn tails.
        return orjson.dumps(orjson.loads(data), option=orjson.OPT_INDENT_2) + b"\n"

    def plan(self, entries: Iterable[RecordEntry] | PartitionLines) -> BatchPlan:
        """Decide files and offsets for a batch without writing anything (nor changing
        `entries`: a failed write plans the same batch again)."""
        lines = (
            entries if isinstance(entries, PartitionLines) else PartitionLines.from_entries(entries)
        )
        plan = BatchPlan(records=lines.total, errors=lines.errors, partitions=dict(lines.records))
        sanitized = self._sanitized
        if len(sanitized) > 10_000:  # bounded: distinct hosts seen recently
            sanitized.clear()
        grouped: dict[tuple[str, str], list[bytes]] = {}
        for (date, host), chunks in lines.chunks.items():
            safe = sanitized.get(host)
            if safe is None:
                safe = sanitized[host] = sanitize_partition_value(host)
            if (date, safe) in grouped:  # two raw hosts, one sanitized directory
                grouped[(date, safe)] = grouped[(date, safe)] + chunks
            else:
                grouped[(date, safe)] = chunks
        for key, chunks in grouped.items():
            current = self._files.get(key)
            if self.log_format == "jsonl" and current is not None:
                # Common case: the whole group fits in the open file: one join, no per-line copy.
                total = sum(map(len, chunks)) + len(chunks)
                if current.size + total <= self.max_bytes:
                    data = b"\n".join([*chunks, b""])  # ends with a newline too
                    plan.parts.append(_Part(key, current.path, current.size, data))
                    continue
            encoded = [self._encode_line(line) for chunk in chunks for line in chunk.split(b"\n")]
            self._plan_lines(plan, key, current, encoded)
        return plan

    def _plan_lines(
        self, plan: BatchPlan, key: tuple[str, str], current: _OpenFile | None, lines: list[bytes]
    ) -> None:
        """Place lines one by one, rotating to a new file whenever the next one would not fit."""
        path = current.path if current else None
        start = size = current.size if current else 0
        chunk: list[bytes] = []
        for line in lines:
            if path is None or (size > 0 and size + len(line) > self.max_bytes):
                if chunk and path is not None:
                    plan.parts.append(_Part(key, path, start, b"".join(chunk)))
                path = self._next_path(key, after=path)
                plan.new_files += 1
                chunk, start, size = [], 0, 0
            chunk.append(line)
            size += len(line)
        if chunk and path is not None:
            plan.parts.append(_Part(key, path, start, b"".join(chunk)))

    def _next_path(self, key: tuple[str, str], after: Path | None) -> Path:
        directory = partition_dir(self.log_dir, key[0], key[1])
        seq = 1
        if after is not None:
            seq = int(after.stem.rsplit("-", 1)[1]) + 1
        while True:
            candidate = directory / f"{self.owner}-{seq:06d}{self._suffix}"
            # A name compressed in place (`X.jsonl.gz`) is taken too: readers read only the
            # plain file of a pair, which must therefore hold the same records.
            if not candidate.exists() and not candidate.with_name(candidate.name + ".gz").exists():
                return candidate
            seq += 1

    # -- writing ----------------------------------------------------------------------------
    def write(self, plan: BatchPlan) -> None:
        """Append the planned parts and make them durable; on error, undo this batch's bytes."""
        done: list[tuple[_OpenFile, int]] = []
        crash_point("before-write")
        try:
            for part in plan.parts:
                handle = self._handle(part)
                done.append((handle, part.offset))
                view = memoryview(part.data)
                while view:
                    written = os.write(handle.fd, view)
                    view = view[written:]
                handle.size = part.offset + len(part.data)
                handle.written_at = time.monotonic()
            crash_point("after-write")
            if self.fsync:
                # A file rotated away mid-batch was synced when it was closed.
                self._sync([handle.fd for handle, _ in done if handle.fd >= 0])
            crash_point("after-fsync")
        except BaseException:
            for handle, offset in done:
                self._rollback(handle, offset)
            raise

    def _sync(self, fds: list[int]) -> None:
        """Make the files durable, several at once: each sync waits for the disk (and the
        journal), and concurrent ones share commits - 4 files synced one after another are
        3-4 times slower than 4 synced together on ext4."""
        if len(fds) == 1:
            _datasync(fds[0])
            return
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="vllm-mw-sync")
        for _ in self._sync_pool.map(_datasync, fds):  # raises the first failure
            pass

    def write_batch(self, entries: Sequence[RecordEntry]) -> WriteResult:
        plan = self.plan(entries)
        self.write(plan)
        by_partition = plan.partitions
        return WriteResult(plan.records, plan.errors, plan.nbytes, plan.new_files, by_partition)

    def _handle(self, part: _Part) -> _OpenFile:
        key, path, offset = part.key, part.path, part.offset
        current = self._files.get(key)
        if current is not None and current.path == path:
            return current
        rotating = current is not None
        if current is not None:
            if self.fsync:
                _datasync(current.fd)
            self._forget(current)
        new_dir = not path.parent.exists()
        make_dirs(path.parent, self.modes.dir)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        fd, _ = create_file(path, flags, self.modes.file)
        handle = _OpenFile(path, fd, os.fstat(fd).st_size)
        if handle.size != offset:
            # Only a crashed predecessor leaves a file at an unexpected size; trust the plan.
            os.ftruncate(fd, offset)
            handle.size = offset
        self._files[key] = handle
        if rotating:
            crash_point("rotation")  # the old file's part written and synced, the new one empty
        if self.fsync:
            # A new file's directory entry must be durable too, or a crash can lose the file.
            fsync_dir(path.parent)
            if new_dir:
                fsync_dir(path.parent.parent)
                fsync_dir(self.log_dir)
        return handle

    def _rollback(self, handle: _OpenFile, offset: int) -> None:
        try:
            if handle.fd >= 0:
                os.ftruncate(handle.fd, offset)
                handle.size = offset
            else:
                os.truncate(handle.path, offset)
        except OSError:
            # The file is now in an unknown state: forget it so the next batch starts a new one.
            self._forget(handle)

    def _forget(self, handle: _OpenFile) -> None:
        for key, current in list(self._files.items()):
            if current is handle:
                del self._files[key]
        if handle.fd >= 0:
            fd, handle.fd = handle.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def close_idle(self, idle_s: float) -> int:
        """Close the files not written for `idle_s` seconds; returns how many. The next plan
        for a closed file's partition starts a new file; only a batch already planned into it
        (written right after) appends to it once more. So retention and compaction can take
        files unchanged for well over `idle_s`: no writer will touch them again."""
        now = time.monotonic()
        idle = [h for h in self._files.values() if now - h.written_at >= idle_s]
        for handle in idle:
            self._forget(handle)
        return len(idle)

    @property
    def open_files(self) -> int:
        """Files this writer holds open (one per partition it wrote to lately)."""
        return len(self._files)

    def close(self) -> None:
        for handle in list(self._files.values()):
            self._forget(handle)
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
            self._sync_pool = None


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a new file is lost in a crash without this)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
