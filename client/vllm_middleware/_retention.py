"""Retention: delete whole date partitions older than N days.

Like `_partition.py`, a pure plan first (`plan_retention`: which `date=` directories, what they
hold, nothing changed), then the deletion (`apply_retention`). A partition is taken only when
every file in it has been unchanged for `min_age_s`: writers close files they have not written
for `file_idle_s` (default 300 s) and never append to a closed file again, so no writer still
holds one open (keep `min_age_s` well above `file_idle_s`). A late record for an old date
(a spool replayed days later) keeps its partition until it too has aged.

Deleting: the directory is first renamed to a dot-name (`.retention-...`: readers only look at
`date=` entries, so a reader sees the whole partition or none of it), checked again (a file
changed meanwhile puts it back), then removed.

Media files (`media/`) are not collected here: a content-addressed file may be shared by kept
and deleted records. `_media_gc.py` deletes those no remaining record references, after this.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from ._exceptions import ConfigurationError
from ._partition import is_valid_date

__all__ = ["RetentionPlan", "RetentionResult", "apply_retention", "plan_retention"]

_TRASH_PREFIX = ".retention-"


@dataclass(frozen=True)
class PartitionInfo:
    path: Path
    date: str
    files: int
    bytes: int
    newest_mtime: float


@dataclass
class RetentionPlan:
    log_dir: Path
    cutoff: str  # partitions of dates before this one are old
    min_age_s: float
    planned_at: float
    delete: list[PartitionInfo] = field(default_factory=list)
    #: old partitions kept because a file in them changed within `min_age_s`
    recent: list[PartitionInfo] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.delete)


@dataclass
class RetentionResult:
    deleted: list[str] = field(default_factory=list)
    bytes: int = 0
    files: int = 0
    errors: list[str] = field(default_factory=list)


class _DirScan(NamedTuple):
    files: int
    bytes: int
    newest_mtime: float


def _scan(path: Path) -> _DirScan:
    files = size = 0
    newest = 0.0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                stat = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            files += 1
            size += stat.st_size
            newest = max(newest, stat.st_mtime)
    return _DirScan(files, size, newest)


def plan_retention(
    log_dir: str | os.PathLike[str],
    keep_days: int,
    *,
    today: date | None = None,
    min_age_s: float = 3600.0,
    now: float | None = None,
) -> RetentionPlan:
    """Partitions dated before `today - keep_days` (UTC) whose files are all older than
    `min_age_s`. `keep_days=1` keeps today and yesterday."""
    if keep_days < 1:
        raise ConfigurationError("keep_days must be at least 1")
    day = today or datetime.now(UTC).date()
    cutoff = (day - timedelta(days=keep_days)).isoformat()
    root = Path(log_dir)
    clock = time.time() if now is None else now
    plan = RetentionPlan(root, cutoff, min_age_s, clock)
    if not root.is_dir():
        return plan
    for entry in sorted(root.iterdir()):
        name = entry.name
        if not (name.startswith("date=") and entry.is_dir() and not entry.is_symlink()):
            continue
        when = name[5:]
        if not is_valid_date(when) or when >= cutoff:
            continue
        files, size, newest = _scan(entry)
        info = PartitionInfo(entry, when, files, size, newest)
        (plan.recent if clock - newest < min_age_s else plan.delete).append(info)
    return plan


def apply_retention(plan: RetentionPlan) -> RetentionResult:
    """Delete the planned partitions; errors are collected, never raised."""
    result = RetentionResult()
    for info in plan.delete:
        trash = info.path.with_name(f"{_TRASH_PREFIX}{info.path.name}-{os.urandom(4).hex()}")
        try:
            os.rename(info.path, trash)
        except FileNotFoundError:
            continue
        except OSError as exc:
            result.errors.append(f"{info.path}: {exc}")
            continue
        files, size, newest = _scan(trash)
        if time.time() - newest < plan.min_age_s:
            # Written to between the plan and the rename (a late record): put it back.
            try:
                os.rename(trash, info.path)
                result.errors.append(f"{info.path}: changed during retention, kept")
            except OSError as exc:
                why = f"changed during retention, left in {trash}"
                result.errors.append(f"{info.path}: {why}: {exc}")
            continue
        try:
            shutil.rmtree(trash)
        except OSError as exc:
            result.errors.append(f"{trash}: {exc}")
            continue
        result.deleted.append(info.date)
        result.bytes += size
        result.files += files
    return result
