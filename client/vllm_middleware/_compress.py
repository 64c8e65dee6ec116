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
from ._modes import create_file
from ._partition import fsync_dir, is_valid_date

__all__ = ["CompressResult", "compress_tree"]

PLAIN_SUFFIXES = (".jsonl", ".json")
GZ = ".gz"
_CHUNK = 1024 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_TEMP = re.compile(r"^\..+\.gz\.[0-9a-f]{8}\.tmp$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | _NOFOLLOW


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


def _compress_partition(
    part: Path, clock: float, min_age_s: float, level: int, result: CompressResult
) -> None:
    with os.scandir(part) as entries:
        listing = {e.name: e for e in entries}
    for name in sorted(listing):
        entry = listing[name]
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if _TEMP.match(name):
            # Left by a crashed run, not a live one (ctime: the mtime copied from the
            # original is old at once).
            if clock - info.st_ctime >= min_age_s:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    result.stale_temps_removed += 1
            continue
        if name.startswith((".", "_")) or not name.endswith(PLAIN_SUFFIXES):
            continue
        if not stat.S_ISREG(info.st_mode):
            continue  # links, FIFOs, directories: never ours to rewrite
        if clock - info.st_mtime < min_age_s:
            result.skipped_recent += 1
            continue
        path = Path(entry.path)
        try:
            if name + GZ in listing:
                _finish_pair(path, result)
            else:
                _compress_file(path, level, result)
        except _Changed as exc:
            result.errors.append(f"{path}: {exc}")
        except OSError as exc:
            result.errors.append(f"{path}: {exc}")


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_ino, b.st_size, b.st_mtime_ns)


def _compress_file(path: Path, level: int, result: CompressResult) -> None:
    target = path.with_name(path.name + GZ)
    temp = path.with_name(f".{target.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(path, _READ_FLAGS)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return
        out, _ = create_file(
            temp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), before.st_mode & 0o777
        )
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
            os.rename(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    crash_point("compress-after-rename")
    _remove_original(path, before)
    result.compressed += 1
    result.bytes_before += before.st_size
    result.bytes_after += size


def _remove_original(path: Path, before: os.stat_result) -> None:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return  # another compressor finished it
    if not _same(before, now):
        raise _Changed("changed after it was compressed; both kept, the plain one is read")
    os.unlink(path)
    fsync_dir(path.parent)


def _digest_plain(path: Path) -> tuple[str, os.stat_result]:
    fd = os.open(path, _READ_FLAGS)
    try:
        info = os.fstat(fd)
        digest = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
        return digest.hexdigest(), info
    finally:
        os.close(fd)


def _digest_gzip(path: Path) -> str | None:
    """sha256 of the decompressed bytes; None when the file is not one complete gzip stream."""
    fd = os.open(path, _READ_FLAGS)
    try:
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
    finally:
        os.close(fd)


def _finish_pair(path: Path, result: CompressResult) -> None:
    """An interrupted compression (both files there): remove the original if the compressed
    file holds exactly its bytes."""
    target = path.with_name(path.name + GZ)
    if not stat.S_ISREG(os.lstat(target).st_mode):
        raise _Changed(f"{target.name} is not a regular file; both kept")
    plain, info = _digest_plain(path)
    if _digest_gzip(target) != plain:
        raise _Changed(f"{target.name} does not hold this file's records; both kept")
    _remove_original(path, info)
    result.finished_pairs += 1
