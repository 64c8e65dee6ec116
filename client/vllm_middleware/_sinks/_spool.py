"""The client's local spool: batches that Redis did not take wait on disk until it answers again.

Layout: `spool_dir/<stream>-<redis address hash>/<created ns>-<pid>-<token>.seg`. A segment is a
sequence of frames, one per record:

    magic (4) | payload length (u32) | crc32 of payload (u32) | payload
    payload = is_error (u8) | index in batch (u32) | batch size (u32)
              | len(batch id) (u8) | batch id | len(date) (u8) | date | len(host) (u16) | host
              | record bytes

Per record (not per batch) so that a damaged region costs only the records it overlaps: the
reader skips to the next frame whose header and checksum verify, and counts what it skipped.
The batch id and position travel with every record so a replay can be made idempotent with the
same marker keys as a live flush (see `_redis_sink.py`).

Ownership: a process holds an exclusive `flock` on every segment it writes or adopted, for as
long as it has the segment open. A segment nobody holds a lock on belongs to a dead (or closed)
process and is adopted by whichever process locks it first. A new segment is created under a
temporary name and renamed once locked, so nobody can adopt it in between.

Not thread-safe: the Redis sink calls every method from one executor thread, off the event loop.
Durability: each appended batch is written with one `write` and then `fsync`ed (when `fsync` is
on, the default); a crash can only tear the last frame, which the reader then skips and counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import stat
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._modes import SPOOL_MODES, make_dirs
from .._partition import fsync_dir
from .._record import RecordEntry

__all__ = ["Spool", "SpoolGroup"]

_MAGIC = b"\xf5VMS"
_HEADER = struct.Struct("<4sII")
_FIXED = struct.Struct("<BIIB")
_MAX_FRAME = 256 * 1024 * 1024
# Frames are read from a window of this size, not with two preads each: a replay runs in a
# thread, and every syscall gives up the GIL, which a busy event loop then holds for up to a
# switch interval (5 ms) - 200 syscalls per 100-record group made a replay crawl under load.
_READ_AHEAD = 1024 * 1024
_SUFFIX = ".seg"
_TMP_PREFIX = ".tmp-"


def encode_frame(batch_id: str, index: int, total: int, entry: RecordEntry) -> bytes:
    bid, date, host = batch_id.encode(), entry.date.encode(), entry.host.encode()
    payload = b"".join(
        (
            _FIXED.pack(1 if entry.is_error else 0, index, total, len(bid)),
            bid,
            bytes((len(date),)),
            date,
            struct.pack("<H", len(host)),
            host,
            entry.data,
        )
    )
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> tuple[str, int, int, RecordEntry]:
    err, index, total, bid_len = _FIXED.unpack_from(payload, 0)
    pos = _FIXED.size
    batch_id = payload[pos : pos + bid_len].decode()
    pos += bid_len
    date_len = payload[pos]
    date = payload[pos + 1 : pos + 1 + date_len].decode()
    pos += 1 + date_len
    (host_len,) = struct.unpack_from("<H", payload, pos)
    host = payload[pos + 2 : pos + 2 + host_len].decode()
    pos += 2 + host_len
    return batch_id, index, total, RecordEntry(date, host, bool(err), payload[pos:])


@dataclass
class _Segment:
    path: Path
    fd: int
    size: int
    read_offset: int = 0


@dataclass
class SpoolGroup:
    """Consecutive spooled records of one batch, to replay as one transaction."""

    batch_id: str
    first_index: int
    total: int  # records in the original batch
    entries: list[RecordEntry] = field(default_factory=list)
    segment: _Segment | None = None
    end_offset: int = 0

    @property
    def complete(self) -> bool:
        """All records of the original batch, none lost to damage: replay under its own id."""
        return self.first_index == 0 and len(self.entries) == self.total


class Spool:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        segment_bytes: int = 8 * 1024 * 1024,
        fsync: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        # Spooled records are the app's traffic: for this user only, whatever the umask (the
        # leaf is the library's own, so one left wider by an older version is narrowed too).
        make_dirs(self.directory, SPOOL_MODES.dir)
        if stat.S_IMODE(self.directory.stat().st_mode) != SPOOL_MODES.dir:
            with contextlib.suppress(PermissionError):  # not ours to change
                os.chmod(self.directory, SPOOL_MODES.dir)
        self._token = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._seq = itertools.count(1)
        self._segments: list[_Segment] = []  # oldest first; the active one (if any) is last
        self._active: _Segment | None = None
        self.damaged_regions = 0
        self.damaged_bytes = 0
        self.adopted_segments = 0

    # -- size -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes on disk in segments this process holds (replayed or not)."""
        return sum(seg.size for seg in self._segments)

    def __bool__(self) -> bool:
        return any(seg.read_offset < seg.size for seg in self._segments)

    # -- writing ----------------------------------------------------------------------------
    def append(self, batch_id: str, entries: Sequence[RecordEntry]) -> bool:
        """Write a batch durably; False (nothing written) when it would exceed `max_bytes`.

        Raises OSError when the disk refuses; the segment is then cut back to its old size.
        """
        return self.append_many([(batch_id, entries)])

    def append_many(self, batches: Sequence[tuple[str, Sequence[RecordEntry]]]) -> bool:
        """`append` for several batches: one write, one fsync, all or nothing."""
        data = b"".join(
            encode_frame(batch_id, i, len(entries), e)
            for batch_id, entries in batches
            for i, e in enumerate(entries)
        )
        if self.nbytes + len(data) > self.max_bytes:
            return False
        segment = self._writable()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(segment.fd, view) :]
            if self.fsync:
                os.fsync(segment.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(segment.fd, segment.size)
            raise
        segment.size += len(data)
        return True

    def _writable(self) -> _Segment:
        active = self._active
        if active is not None and active.size < self.segment_bytes:
            return active
        name = f"{time.time_ns():020d}-{self._token}-{next(self._seq)}{_SUFFIX}"
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(tmp, flags, SPOOL_MODES.file)
        try:
            os.fchmod(fd, SPOOL_MODES.file)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = self.directory / name
            os.rename(tmp, path)
            if self.fsync:
                fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        segment = _Segment(path, fd, 0)
        self._segments.append(segment)
        self._active = segment
        return segment

    # -- adoption ---------------------------------------------------------------------------
    def adopt_orphans(self) -> int:
        """Take over segments no live process holds; returns how many were adopted."""
        mine = {seg.path.name for seg in self._segments}
        adopted = 0
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.startswith(_TMP_PREFIX):
                self._remove_orphan_tmp(path)
                continue
            if not name.endswith(_SUFFIX) or name in mine:
                continue
            segment = self._lock_existing(path)
            if segment is None:
                continue
            # Adopted segments are older than what this process writes now: replay them first.
            at = len(self._segments) - (1 if self._active is not None else 0)
            self._segments.insert(at, segment)
            adopted += 1
        self.adopted_segments += adopted
        return adopted

    def _lock_existing(self, path: Path) -> _Segment | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The owner may have finished and unlinked it between our open and our lock.
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
            return _Segment(path, fd, os.fstat(fd).st_size)
        except OSError:
            os.close(fd)
            return None

    def _remove_orphan_tmp(self, path: Path) -> None:
        # A process died between creating and renaming a segment: it is empty by construction.
        segment = self._lock_existing(path)
        if segment is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(segment.fd)

    # -- reading ----------------------------------------------------------------------------
    def next_group(self) -> SpoolGroup | None:
        """The oldest unreplayed records of one batch (not consumed until `commit`)."""
        while self._segments:
            segment = self._segments[0]
            group = self._read_group(segment)
            if group is not None:
                return group
            if segment is self._active:
                return None
            self._drop_segment(segment)
        return None

    def commit(self, group: SpoolGroup) -> None:
        """Mark `group` replayed; delete its segment once it is fully replayed."""
        segment = group.segment
        if segment is None or segment not in self._segments:
            return
        segment.read_offset = group.end_offset
        if segment.read_offset >= segment.size:
            self._drop_segment(segment)

    def _drop_segment(self, segment: _Segment) -> None:
        with contextlib.suppress(OSError):
            os.unlink(segment.path)
        with contextlib.suppress(OSError):
            os.close(segment.fd)
        self._segments.remove(segment)
        if segment is self._active:
            self._active = None

    def _read_group(self, segment: _Segment) -> SpoolGroup | None:
        offset = segment.read_offset
        group: SpoolGroup | None = None
        window = _Window(segment)
        while offset < segment.size:
            frame = self._read_frame(segment, offset, window)
            if frame is None:
                if group is not None:
                    break  # replay what we have; the damage is handled on the next read
                offset = self._resync(segment, offset)
                segment.read_offset = offset
                continue
            (batch_id, index, total, entry), end = frame
            if group is None:
                group = SpoolGroup(batch_id, index, total, segment=segment)
            elif batch_id != group.batch_id or index != group.first_index + len(group.entries):
                break
            group.entries.append(entry)
            group.end_offset = offset = end
            if len(group.entries) + group.first_index >= total:
                break
        return group

    def _read_frame(
        self, segment: _Segment, offset: int, window: _Window | None = None
    ) -> tuple[tuple[str, int, int, RecordEntry], int] | None:
        window = window or _Window(segment)
        header = window.read(offset, _HEADER.size)
        if len(header) < _HEADER.size:
            return None
        magic, length, crc = _HEADER.unpack(header)
        if magic != _MAGIC or length > _MAX_FRAME or offset + _HEADER.size + length > segment.size:
            return None
        payload = window.read(offset + _HEADER.size, length)
        if len(payload) != length or zlib.crc32(payload) != crc:
            return None
        try:
            decoded = _decode_payload(payload)
        except (struct.error, IndexError, UnicodeDecodeError):
            return None
        return decoded, offset + _HEADER.size + length

    def _resync(self, segment: _Segment, offset: int) -> int:
        """Skip a damaged region: find the next verifiable frame; count what was skipped."""
        rest = os.pread(segment.fd, segment.size - offset, offset)
        window = _Window(segment)
        pos = 1
        while True:
            pos = rest.find(_MAGIC, pos)
            if pos < 0:
                pos = len(rest)
                break
            if self._read_frame(segment, offset + pos, window) is not None:
                break
            pos += 1
        self.damaged_regions += 1
        self.damaged_bytes += pos
        return offset + pos

    def close(self) -> None:
        """Release the locks; what is not replayed stays on disk for the next process."""
        for segment in list(self._segments):
            if segment.read_offset >= segment.size:
                with contextlib.suppress(OSError):
                    os.unlink(segment.path)
            with contextlib.suppress(OSError):
                os.close(segment.fd)
        self._segments.clear()
        self._active = None


class _Window:
    """Reads of one segment served from one larger pread (see `_READ_AHEAD`)."""

    __slots__ = ("data", "segment", "start")

    def __init__(self, segment: _Segment) -> None:
        self.segment = segment
        self.start = 0
        self.data = b""

    def read(self, offset: int, length: int) -> bytes:
        begin = offset - self.start
        if begin < 0 or begin + length > len(self.data):
            self.start, begin = offset, 0
            self.data = os.pread(self.segment.fd, max(length, _READ_AHEAD), offset)
        return self.data[begin : begin + length]
