"""Intents: what a consumer records before writing a batch, and what recovery may do with one.

An intent names, for one unacknowledged batch, the entry ids it holds and each file part it
writes: `{"v": 2, "ids": [first, last], "parts": [[path relative to log_dir, offset, length]]}`.
Whoever recovers the consumer cuts those files back to the offsets. A cut erases records, and
the inflight hash is writable by any Redis client, so an intent is only acted on when it is
plausible (`plan_cuts`): each path is one of the consumer's own files inside `log_dir`
(`date=D/host=H/<owner>-<n>.jsonl`), each part at most one batch long, no file holds bytes
past the end of the parts naming it (those would be later, acknowledged batches), and - checked
by the caller in Redis - the batch's entries are still pending for that consumer (the
acknowledgement removes the intent and the pending entries atomically, so an intent whose
entries are acknowledged is stale or forged). Anything else is refused, never acted on.

Pure: no Redis, no writes; the caller stats the files and passes their sizes in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson
from vllm_middleware.storage import is_valid_date, sanitize_partition_value

__all__ = ["Cut", "Intent", "encode_intent", "parse_intent", "plan_cuts"]

_VERSION = 2
_HOST_DIR = re.compile(r"host=[A-Za-z0-9_-][A-Za-z0-9._-]*")
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


class Cut(NamedTuple):
    """A file to cut back to where an unfinished batch started."""

    path: str  # relative to log_dir
    offset: int


@dataclass(frozen=True)
class Intent:
    ids: tuple[str, str]  # first and last entry id of the batch
    parts: tuple[tuple[str, int, int], ...]  # (relative path, offset, length)


def encode_intent(ids: Sequence[bytes], parts: Sequence[tuple[str, int, int]]) -> bytes:
    first, last = (ids[0], ids[-1]) if ids else (b"", b"")
    return orjson.dumps(
        {"v": _VERSION, "ids": [first.decode(), last.decode()], "parts": [list(p) for p in parts]}
    )


def parse_intent(raw: bytes, owner: str, max_batch_bytes: int) -> Intent | str:
    """The intent of consumer `owner`, checked on its own; or why it is refused."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        return "not an intent of this version (v2)"
    ids, raw_parts = data.get("ids"), data.get("parts")
    if not (
        isinstance(ids, list)
        and len(ids) == 2
        and all(isinstance(i, str) and _STREAM_ID.fullmatch(i) for i in ids)
    ):
        return "no valid entry ids"
    if not isinstance(raw_parts, list) or len(raw_parts) > 100_000:
        return "no valid parts"
    parts: list[tuple[str, int, int]] = []
    total = 0
    prefix = sanitize_partition_value(owner) + "-"
    for part in raw_parts:
        if not (
            isinstance(part, list)
            and len(part) == 3
            and isinstance(part[0], str)
            and type(part[1]) is int
            and type(part[2]) is int
        ):
            return "malformed part"
        path, offset, length = part
        reason = _own_file(path, prefix)
        if reason:
            return f"{reason}: {path[:200]!r}"
        if offset < 0 or length <= 0:
            return f"impossible offset or length for {path[:200]!r}"
        total += length
        parts.append((path, offset, length))
    if total > max_batch_bytes:
        return f"parts of {total} bytes, more than one batch ({max_batch_bytes})"
    return Intent((ids[0], ids[1]), tuple(parts))


def _own_file(path: str, prefix: str) -> str:
    pieces = path.split("/")
    if len(pieces) != 3:
        return "not a partition file path"
    date_dir, host_dir, name = pieces
    if not (date_dir.startswith("date=") and is_valid_date(date_dir[5:])):
        return "not a date= directory"
    if not _HOST_DIR.fullmatch(host_dir):
        return "not a host= directory"
    stem, dot, suffix = name.rpartition(".")
    if not (dot and suffix in ("jsonl", "json") and stem.startswith(prefix)):
        return "not a file of this consumer"
    if not (stem[len(prefix) :].isdigit() and stem[len(prefix) :].isascii()):
        return "not a file of this consumer"
    return ""


def plan_cuts(intents: Sequence[Intent], sizes: Mapping[str, int | None]) -> list[Cut] | str:
    """Where to cut each file back to, given the intents of one consumer and each named
    file's size now (None: missing); or why not."""
    lowest: dict[str, int] = {}
    end: dict[str, int] = {}
    for intent in intents:
        for path, offset, length in intent.parts:
            lowest[path] = min(offset, lowest.get(path, offset))
            end[path] = max(offset + length, end.get(path, 0))
    cuts = []
    for path, offset in lowest.items():
        size = sizes.get(path)
        if size is None or size <= offset:
            continue  # never written, or already cut
        if size > end[path]:
            return f"{path[:200]!r} holds {size - end[path]} bytes past the batch"
        cuts.append(Cut(path, offset))
    return cuts
