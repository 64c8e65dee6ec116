"""Media retention: delete the media files (`log_dir/media/<xx>/<sha256>.<ext>`) that no record
left in the tree references.

Run after retention has deleted partitions (`vllm-mw retention`, the retention cron). A file is
taken only when all of these hold, and nothing is taken when the scan may have missed a record:

- no record in the tree mentions its hash: every record of every file the reader reads (JSONL,
  pretty JSON, their `.gz` forms, Parquet days, flat files) is scanned, and any 64-hex-digit
  string in a record that holds `"media_ref"` counts as a reference (a superset: a false match
  only keeps a file);
- it is older than `grace_s` (mtime and ctime): a record that references it may still be in
  flight, in a client's buffer, in Redis or in a spool. The media writer refreshes the mtime of a
  file that a new record references again (at most every 10 minutes), so the grace period
  covers reused files too; keep it above the longest time a record can spend in a spool;
- it is a regular file named `<sha256>.<ext>` in a two-hex-digit directory of `log_dir/media`,
  reached without a symbolic link (directories are opened with O_NOFOLLOW, the file is checked
  again right before it is removed, relative to its directory's descriptor).

The scan is refused (nothing deleted, the reason reported) if the reader skipped anything that
could hold records (a symbolic link, a non-regular entry, a damaged file, an over-long line),
or if a file it listed was gone or replaced by the end (compaction, retention or a person
changed the tree meanwhile): a later run tries again.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ._read_files import DEFAULT_MAX_LINE_BYTES, ReadStats, iter_documents, list_log_files

__all__ = ["MediaGcPlan", "MediaGcResult", "apply_media_gc", "plan_media_gc"]

_HEX64 = re.compile(rb"[0-9a-f]{64}")
_NAME = re.compile(r"([0-9a-f]{64})\.[a-z0-9]{1,10}")
_TEMP = re.compile(r"\.[0-9a-f]{64}\.[a-z0-9]{1,10}\.\d+\.[0-9a-f]{8}\.tmp")
_SUBDIR = re.compile(r"[0-9a-f]{2}")
_MARKER = b'"media_ref"'
_DIR_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_DIRECTORY", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
DEFAULT_GRACE_S = 7 * 86400.0


@dataclass(frozen=True)
class MediaFile:
    subdir: str
    name: str
    inode: int
    bytes: int
    changed_ns: tuple[int, int]  # (mtime, ctime) when planned: a touch since keeps the file


@dataclass
class MediaGcPlan:
    media_dir: Path
    grace_s: float
    planned_at: float
    referenced: int = 0  # distinct hashes the records mention
    records_scanned: int = 0
    files_scanned: int = 0
    delete: list[MediaFile] = field(default_factory=list)
    kept_recent: int = 0  # unreferenced, but within the grace period
    refused: str | None = None  # why nothing may be deleted this time

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.delete)


@dataclass
class MediaGcResult:
    deleted: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)


class _FileId(NamedTuple):
    """Which file a path names: a file replaced under the same name gets another one."""

    device: int
    inode: int


def _file_id(path: Path) -> _FileId | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return _FileId(info.st_dev, info.st_ino)


def _references(root: Path, plan: MediaGcPlan, excluding: Collection[str]) -> set[bytes] | None:
    """Every hash the tree's records mention (not counting the `excluding` days); None (and
    `plan.refused`) if the scan is incomplete."""
    stats = ReadStats()
    skip = {root / f"date={day}" for day in excluding}
    listed = [
        path
        for path in list_log_files(root, None, None, None, follow_symlinks=False, stats=stats)
        if path.parent.parent not in skip
    ]
    before = {path: _file_id(path) for path in listed}
    found: set[bytes] = set()
    for path in listed:
        plan.files_scanned += 1
        for doc in iter_documents(
            path, follow_symlinks=False, max_line_bytes=DEFAULT_MAX_LINE_BYTES, stats=stats
        ):
            plan.records_scanned += 1
            if _MARKER in doc:
                found.update(_HEX64.findall(doc))
    skipped = {
        "symbolic links": stats.skipped_links,
        "entries that are not regular files": stats.skipped_entries,
        "damaged files": stats.damaged_files,
        "over-long records": stats.long_lines,
    }
    missed = [f"{count} {what}" for what, count in skipped.items() if count]
    if missed:
        plan.refused = "the reader skipped " + ", ".join(missed) + " (they may hold references)"
        return None
    for path, file_id in before.items():
        now = _file_id(path)
        compressed = now is None and _file_id(path.with_name(path.name + ".gz")) is not None
        if now != file_id and not compressed:
            plan.refused = f"{path} changed during the scan (compaction or retention?)"
            return None
    return found


def _media_files(media_fd: int) -> Iterator[tuple[str, str, os.stat_result]]:
    """(subdir, name, lstat) of every entry in the two-hex-digit directories."""
    for subdir in sorted(os.listdir(media_fd)):
        if _SUBDIR.fullmatch(subdir) is None:
            continue
        try:
            sub_fd = os.open(subdir, _DIR_FLAGS, dir_fd=media_fd)
        except OSError:  # a symbolic link (ELOOP), not a directory, gone
            continue
        try:
            for name in sorted(os.listdir(sub_fd)):
                with contextlib.suppress(FileNotFoundError):
                    yield subdir, name, os.stat(name, dir_fd=sub_fd, follow_symlinks=False)
        finally:
            os.close(sub_fd)


def _open_media_dir(log_dir: Path) -> int | None:
    """A descriptor on `log_dir/media`, both reached without following a symbolic link."""
    try:
        root_fd = os.open(log_dir, _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        return os.open("media", _DIR_FLAGS, dir_fd=root_fd)
    except OSError:
        return None
    finally:
        os.close(root_fd)


def plan_media_gc(
    log_dir: str | os.PathLike[str],
    *,
    grace_s: float = DEFAULT_GRACE_S,
    now: float | None = None,
    excluding_days: Collection[str] = (),
) -> MediaGcPlan:
    """Which media files no record references (nothing is changed). `excluding_days`: count
    those days' records as gone (a dry run of retention)."""
    root = Path(log_dir)
    plan = MediaGcPlan(root / "media", grace_s, time.time() if now is None else now)
    media_fd = _open_media_dir(root)
    if media_fd is None:
        return plan  # no media store here (or a symbolic link: never followed)
    try:
        references = _references(root, plan, excluding_days)
        if references is None:
            return plan
        plan.referenced = len(references)
        for subdir, name, info in _media_files(media_fd):
            if not stat.S_ISREG(info.st_mode):
                continue
            match = _NAME.fullmatch(name)
            if match is None:
                if _TEMP.fullmatch(name) is None:
                    continue  # not the media writer's: left alone
            elif match.group(1).encode() in references or match.group(1)[:2] != subdir:
                continue
            if plan.planned_at - max(info.st_mtime, info.st_ctime) < grace_s:
                plan.kept_recent += 1
                continue
            times = (info.st_mtime_ns, info.st_ctime_ns)
            plan.delete.append(MediaFile(subdir, name, info.st_ino, info.st_size, times))
    finally:
        os.close(media_fd)
    return plan


def apply_media_gc(plan: MediaGcPlan) -> MediaGcResult:
    """Delete the planned files, each checked again right before (the same file, not touched
    since the plan)."""
    result = MediaGcResult()
    if plan.refused is not None or not plan.delete:
        return result
    media_fd = _open_media_dir(plan.media_dir.parent)
    if media_fd is None:
        return result
    try:
        for item in plan.delete:
            try:
                _delete(media_fd, item)
            except FileNotFoundError:
                continue
            except OSError as exc:
                result.errors.append(f"media/{item.subdir}/{item.name}: {exc}")
                continue
            result.deleted += 1
            result.bytes += item.bytes
    finally:
        os.close(media_fd)
    return result


def _delete(media_fd: int, item: MediaFile) -> None:
    sub_fd = os.open(item.subdir, _DIR_FLAGS, dir_fd=media_fd)
    try:
        info = os.stat(item.name, dir_fd=sub_fd, follow_symlinks=False)
        touched = (info.st_mtime_ns, info.st_ctime_ns) != item.changed_ns
        if info.st_ino != item.inode or not stat.S_ISREG(info.st_mode) or touched:
            raise FileNotFoundError  # replaced or referenced again meanwhile: kept
        os.unlink(item.name, dir_fd=sub_fd)
    finally:
        os.close(sub_fd)
