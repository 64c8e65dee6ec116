"""What the spools on this machine hold, read without touching them (for `health` and `spool`).

A spool directory is `<root>/<stream>-<hash of the Redis address>/` (see `_spool.py`); its
segments (`*.seg`) are held with an `flock` by the process writing or replaying them. A segment
nobody holds is stranded: its process died, or closed while Redis was away, and it waits for the
next process that uses the same root, stream and Redis address. Whether a segment is held is
read from `/proc/locks` rather than by trying the lock: taking it, even for a moment, could make
the owner's adoption pass skip the segment.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["SpoolDirectory", "inventory", "spool_root"]

_SEGMENT_SUFFIX = ".seg"


def spool_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The spool root the clients of this environment use (`VLLM_MW_SPOOL_DIR` or the default)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("VLLM_MW_SPOOL_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vllm-middleware" / "spool"


@dataclass(frozen=True)
class SpoolDirectory:
    """One spool directory: what waits in it and whether anybody is replaying it."""

    path: str
    segments: int
    bytes: int
    #: segments no live process holds a lock on (None: locks could not be read)
    stranded_segments: int | None
    oldest_age_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _locked_inodes() -> set[int] | None:
    """Inodes with an flock held by some process, from /proc/locks (None where there is none)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    inodes: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters have a "->" field.
        if "FLOCK" not in fields:
            continue
        for field in fields:
            parts = field.split(":")
            if len(parts) == 3 and parts[2].isdigit():
                inodes.add(int(parts[2]))
                break
    return inodes


def inventory(root: str | os.PathLike[str] | None = None) -> list[SpoolDirectory]:
    """Every spool directory under `root` holding at least one segment, oldest first."""
    base = spool_root(root)
    try:
        children = sorted(p for p in base.iterdir() if p.is_dir())
    except OSError:
        return []
    locked = _locked_inodes()
    now = time.time()
    found = []
    for directory in children:
        count = size = stranded = 0
        oldest: float | None = None
        try:
            names = [p for p in directory.iterdir() if p.name.endswith(_SEGMENT_SUFFIX)]
        except OSError:
            continue
        for path in names:
            try:
                stat = path.stat()
            except OSError:  # replayed and removed meanwhile
                continue
            count += 1
            size += stat.st_size
            oldest = stat.st_mtime if oldest is None else min(oldest, stat.st_mtime)
            if locked is not None and stat.st_ino not in locked:
                stranded += 1
        if count:
            found.append(
                SpoolDirectory(
                    path=str(directory),
                    segments=count,
                    bytes=size,
                    stranded_segments=stranded if locked is not None else None,
                    oldest_age_s=round(now - oldest, 3) if oldest is not None else None,
                )
            )
    return found
