"""Compression of closed log files in place: `X.jsonl` becomes `X.jsonl.gz` (`.json` alike).

`vllm-mw compress` and the worker's compression cron (`VLLM_MW_COMPRESS`). Gzip, because every
reader of the tree reads it without extras: `iter_logs`/`load_logs`, DuckDB (`vllm-mw query`,
compaction), Spark, `zcat`.

Only closed files are taken: a file unchanged for `min_age_s` (writers close files idle for
`file_idle_s` and never append to a closed file again; rotated files and past days qualify
once they have aged). One file, step by step (crash points in brackets):

1. compress into a hidden temp file beside it (`.X.jsonl.gz.<token>.tmp`; readers skip dot
   names), with the original's permission bits and mtime, check the original did not change
   meanwhile, fsync it [`compress-before-rename`];
2. rename the temp file to `X.jsonl.gz`, fsync the directory [`compress-after-rename`];
3. remove `X.jsonl`, fsync the directory.

A crash leaves the original alone (a stale temp file, removed by a later run), or the pair
`X.jsonl` + `X.jsonl.gz` with the same records. Readers read only `X.jsonl` of a pair
(`_read_files.py`, `_compact.py`, `_query.py`), and a reader that listed `X.jsonl` just before
step 3 falls back to `X.jsonl.gz`: every record is read once. The next run checks a pair (the
compressed file holds exactly the original's bytes) and finishes step 3; a pair that differs is
reported and left as it is. Writers never start a new file under a name whose compressed form
exists (`_partition.py`), so a pair is never two different files.

Symbolic links are never followed: partition directories are opened with O_NOFOLLOW and every
file operation is relative to the directory's descriptor; only regular files are taken.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ._crash import crash_point
from ._exceptions import ConfigurationError, LogReadError
from ._partition import is_valid_date

__all__ = ["CompressResult", "compress_tree"]

PLAIN_SUFFIXES = (".jsonl", ".json")
GZ = ".gz"
_CHUNK = 1024 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_TEMP = re.compile(r"^\..+\.gz\.[0-9a-f]{8}\.tmp$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC | _NOFOLLOW
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC | _NOFOLLOW
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC | _NOFOLLOW


@dataclass
class CompressResult:
    compressed: int = 0  # files
    bytes_before: int = 0
    bytes_after: int = 0
    finished_pairs: int = 0  # interrupted compressions completed (the original removed)
    stale_temps_removed: int = 0
    skipped_recent: int = 0  # changed within min_age_s: maybe still open
    errors: list[str] = field(default_factory=list)


class _Changed(Exception):
    """The original changed while it was being compressed: left for a later run."""


def _partitions(root: Path, day: str | None) -> Iterator[Path]:
    """`date=D/host=H` directories (real ones: a symbolic link is never followed)."""
    with os.scandir(root) as days:
        day_dirs = sorted(
            Path(e.path)
            for e in days
            if e.name.startswith("date=")
            and is_valid_date(e.name[5:])
            and (day is None or e.name[5:] == day)
            and e.is_dir(follow_symlinks=False)
        )
    for day_dir in day_dirs:
        with os.scandir(day_dir) as hosts:
            yield from sorted(
                Path(e.path)
                for e in hosts
                if e.name.startswith("host=") and e.is_dir(follow_symlinks=False)
            )


def compress_tree(
    log_dir: str | os.PathLike[str],
    *,
    day: str | None = None,
    min_age_s: float = 3600.0,
    level: int = 6,
    now: float | None = None,
) -> CompressResult:
    """Compress every closed file of the tree (or of `day`, YYYY-MM-DD) in place."""
    if day is not None and not is_valid_date(day):
        raise ConfigurationError(f"date must be YYYY-MM-DD, not {day!r}")
    if not 1 <= level <= 9:
        raise ConfigurationError(f"level must be 1 to 9, not {level}")
    root = Path(log_dir)
    if not root.is_dir():
        raise LogReadError(f"log directory {str(root)!r} does not exist")
    clock = time.time() if now is None else now
    result = CompressResult()
    for part in _partitions(root, day):
        try:
            _compress_partition(part, clock, min_age_s, level, result)
        except OSError as exc:
            result.errors.append(f"{part}: {exc}")
    return result


class _Dir:
    """One partition directory, opened without following a link; every file operation below
    is relative to its descriptor, so that a directory swapped for a link meanwhile cannot lead
    outside the tree."""

    def __init__(self, root: Path, day: str, host: str) -> None:
        root_fd = os.open(root, _DIR_FLAGS & ~_NOFOLLOW)  # log_dir itself may be a link
        try:
            day_fd = os.open(day, _DIR_FLAGS, dir_fd=root_fd)
        finally:
            os.close(root_fd)
        try:
            self.fd = os.open(host, _DIR_FLAGS, dir_fd=day_fd)
        finally:
            os.close(day_fd)

    def close(self) -> None:
        os.close(self.fd)

    def open_read(self, name: str) -> int:
        return os.open(name, _READ_FLAGS, dir_fd=self.fd)

    def create(self, name: str, mode: int) -> int:
        fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=self.fd)
        try:
            os.fchmod(fd, mode)  # whatever the umask
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def sync(self) -> None:
        os.fsync(self.fd)


def _compress_partition(
    part: Path, clock: float, min_age_s: float, level: int, result: CompressResult
) -> None:
    directory = _Dir(part.parent.parent, part.parent.name, part.name)
    try:
        listing = set(os.listdir(directory.fd))
        for name in sorted(listing):
            try:
                _compress_entry(directory, name, listing, clock, min_age_s, level, result)
            except (_Changed, OSError) as exc:
                result.errors.append(f"{part / name}: {exc}")
    finally:
        directory.close()


def _compress_entry(
    directory: _Dir,
    name: str,
    listing: set[str],
    clock: float,
    min_age_s: float,
    level: int,
    result: CompressResult,
) -> None:
    try:
        info = directory.lstat(name)
    except FileNotFoundError:
        return
    if _TEMP.match(name):
        # Left by a crashed run, not a live one (ctime: the mtime copied from the original
        # is old at once).
        if clock - info.st_ctime >= min_age_s:
            with contextlib.suppress(FileNotFoundError):
                directory.unlink(name)
                result.stale_temps_removed += 1
        return
    if name.startswith((".", "_")) or not name.endswith(PLAIN_SUFFIXES):
        return
    if not stat.S_ISREG(info.st_mode):
        return  # links, FIFOs, directories: never ours to rewrite
    if clock - info.st_mtime < min_age_s:
        result.skipped_recent += 1
        return
    if name + GZ in listing:
        _finish_pair(directory, name, result)
    else:
        _compress_file(directory, name, level, result)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns)


def _compress_file(directory: _Dir, name: str, level: int, result: CompressResult) -> None:
    target = name + GZ
    temp = f".{target}.{os.urandom(4).hex()}.tmp"
    fd = directory.open_read(name)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return
        out = directory.create(temp, before.st_mode & 0o777)
        try:
            with open(out, "wb", closefd=True) as sink:
                deflater = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
                while chunk := os.read(fd, _CHUNK):
                    sink.write(deflater.compress(chunk))
                sink.write(deflater.flush())
                sink.flush()
                if not _same(before, os.fstat(fd)):
                    raise _Changed("changed while being compressed; kept as it was")
                os.utime(sink.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
                os.fsync(sink.fileno())
                size = os.fstat(sink.fileno()).st_size
            crash_point("compress-before-rename")
            directory.rename(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                directory.unlink(temp)
            raise
    finally:
        os.close(fd)
    directory.sync()
    crash_point("compress-after-rename")
    _remove_original(directory, name, before)
    result.compressed += 1
    result.bytes_before += before.st_size
    result.bytes_after += size


def _remove_original(directory: _Dir, name: str, before: os.stat_result) -> None:
    try:
        now = directory.lstat(name)
    except FileNotFoundError:
        return  # another compressor finished it
    if not _same(before, now):
        raise _Changed("changed after it was compressed; both kept, the plain one is read")
    directory.unlink(name)
    directory.sync()


def _digest_plain(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _digest_gzip(fd: int) -> str | None:
    """sha256 of the decompressed bytes; None when the file is not one complete gzip stream."""
    digest = hashlib.sha256()
    inflater = zlib.decompressobj(_GZIP_WBITS)
    while chunk := os.read(fd, _CHUNK):
        data = chunk
        while data:
            try:
                digest.update(inflater.decompress(data, _CHUNK))
            except zlib.error:
                return None
            data = inflater.unconsumed_tail
        if inflater.eof and (inflater.unused_data or os.read(fd, 1)):
            return None  # something after the stream: not what this module writes
    return digest.hexdigest() if inflater.eof else None


def _finish_pair(directory: _Dir, name: str, result: CompressResult) -> None:
    """An interrupted compression (both files there): remove the original if the compressed
    file holds exactly its bytes."""
    plain_fd = directory.open_read(name)
    try:
        info = os.fstat(plain_fd)
        packed_fd = directory.open_read(name + GZ)  # O_NOFOLLOW: a link is refused
        try:
            if not stat.S_ISREG(os.fstat(packed_fd).st_mode):
                raise _Changed(f"{name}{GZ} is not a regular file; both kept")
            same = _digest_gzip(packed_fd) == _digest_plain(plain_fd)
        finally:
            os.close(packed_fd)
    finally:
        os.close(plain_fd)
    if not same:
        raise _Changed(f"{name}{GZ} does not hold this file's records; both kept")
    _remove_original(directory, name, info)
    result.finished_pairs += 1
