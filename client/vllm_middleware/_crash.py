"""Deterministic crash points, for the tests that prove the write/ack protocol.

`VLLM_MW_CRASH_AT=<point>[:<n>[:<marker file>]]` makes the process `os._exit(CRASH_EXIT)` the
`n`-th time (default: the first) it passes `<point>`; with a marker file, only if that file
does not exist yet (it is created first), so that a replacement process started with the same
environment (a restarted writer, a second worker) does not crash again. Points: `before-write`,
`after-write`, `after-fsync`, `rotation` (`_partition.py`: worker and embedded writer alike),
`after-plan` (embedded writer, `_writer_main.py`: the batch's intent sent, nothing written),
`before-ack`, `after-ack` (worker).

The variable is read once, at import; unset, a crash point costs a global load and a compare
(once per batch, never per record).
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["CRASH_EXIT", "crash_point"]

CRASH_EXIT = 86


class _CrashAt(NamedTuple):
    """What `VLLM_MW_CRASH_AT` asks for: a point, after how many passes, and a marker file."""

    point: str | None
    passes: int  # exit on this pass
    marker: str | None


def _parse(value: str | None) -> _CrashAt:
    if not value:
        return _CrashAt(None, 0, None)
    point, _, rest = value.partition(":")
    count, _, marker = rest.partition(":")
    return _CrashAt(point, int(count or 1), marker or None)


_POINT, _LEFT, _MARKER = _parse(os.environ.get("VLLM_MW_CRASH_AT"))


def crash_point(name: str) -> None:
    """Exit here, at once and without cleaning up, if the environment asked for it."""
    global _LEFT
    if _POINT is None or name != _POINT:
        return
    _LEFT -= 1
    if _LEFT > 0:
        return
    if _MARKER is not None:
        try:
            os.close(os.open(_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return  # another process crashed here already
    os._exit(CRASH_EXIT)
