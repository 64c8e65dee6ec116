"""`vllm-mw tail`: the latest records, one line each, and `-f` to follow new ones as written.

History comes through the reader (`iter_logs`), newest days first, so a long tree is not read
to show its last lines. Following polls the partition files of recent days: each file is read
from the offset last seen, a line is shown once it is complete (a writer's partial line waits
for its newline), new files (rotation, a new day, a new host) are picked up at the next poll.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import orjson

from ._exceptions import LogReadError
from ._partition import sanitize_partition_value
from ._record_view import RecordFilter, answer_text, iter_filtered, prompt_text, token_counts

__all__ = ["Follower", "format_line", "last_records", "tail"]

_SNIPPET = 48  # characters of prompt and answer on a one-line view
_MAX_PENDING = 64 * 1024 * 1024  # a partial line longer than any record the writers accept


def _snippet(text: str, full: bool) -> str:
    text = " ".join(text.split())
    if full or len(text) <= _SNIPPET:
        return text
    return text[: _SNIPPET - 1] + "…"


def _ms(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.0f}ms"
    return "-"


def format_line(record: Mapping[str, Any], *, full: bool = False) -> str:
    """One line for a record: time, host, model, status, latency, TTFT, tokens, prompt → answer."""
    stamp = record.get("timestamp")
    when = stamp[:19].replace("T", " ") if isinstance(stamp, str) else "-"
    status = record.get("status_code")
    error = record.get("error")
    shown_status = str(status) if status is not None else ("ERR" if error is not None else "-")
    tokens_in, tokens_out = token_counts(record)
    tokens = f"{tokens_in if tokens_in is not None else '-'}→"
    tokens += f"{tokens_out if tokens_out is not None else '-'}"
    prompt = _snippet(prompt_text(record), full)
    answer = (
        _snippet(str(error), full) if error is not None else _snippet(answer_text(record), full)
    )
    arrow = "!!" if error is not None else "→"
    return (
        f"{when}  {record.get('host') or '-'}  {record.get('model') or '-'}  {shown_status}  "
        f"{_ms(record.get('latency_ms'))}  ttft {_ms(record.get('ttft_ms'))}  {tokens}  "
        f"{prompt!r} {arrow} {answer!r}"
    )


def _days(root: Path) -> list[str]:
    if not root.is_dir():
        raise LogReadError(f"log directory {str(root)!r} does not exist")
    with os.scandir(root) as it:
        return sorted(
            (e.name[5:] for e in it if e.name.startswith("date=") and e.is_dir()), reverse=True
        )


def last_records(root: Path, flt: RecordFilter, count: int) -> list[Mapping[str, Any]]:
    """The `count` newest matching records (by timestamp), oldest first, in bounded memory."""
    if count <= 0:
        return []
    newest: list[tuple[str, int, Mapping[str, Any]]] = []
    seq = 0
    for day in _days(root):
        # A day's records are all older than the next day's: stop once a day filled the list.
        day_filter = dataclasses.replace(flt, since=day, until=day)
        for record in iter_filtered(root, day_filter):
            seq += 1
            item = (str(record.get("timestamp") or ""), seq, record.to_dict())
            if len(newest) < count:
                heapq.heappush(newest, item)
            elif item[:2] > newest[0][:2]:
                heapq.heapreplace(newest, item)
        if len(newest) >= count:
            break
    return [item[2] for item in sorted(newest, key=lambda item: item[:2])]


@dataclass
class _Watched:
    offset: int
    inode: int
    pending: bytes = b""
    skipping: bool = False  # inside an over-long line: drop bytes up to its newline


class Follower:
    """Reads what the writers append to the tree's JSONL files after the moment it started.

    Watches the partitions of the last `days` UTC dates (today included) and any newer date
    that appears; records that arrive late for older dates (a spool replayed after a long
    outage) are not followed.
    """

    def __init__(self, root: Path, *, host: str | None = None, days: int = 2) -> None:
        self.root = root
        self.host_dir = f"host={sanitize_partition_value(host)}" if host is not None else None
        today = datetime.now(UTC).date()
        self.first_day = (today - timedelta(days=max(days, 1) - 1)).isoformat()
        self.files: dict[Path, _Watched] = {}
        for path, st in self._scan():
            self.files[path] = _Watched(offset=st.st_size, inode=st.st_ino)
        self.bad_lines = 0

    def _scan(self) -> Iterator[tuple[Path, os.stat_result]]:
        try:
            day_entries = [
                e
                for e in os.scandir(self.root)
                if e.name.startswith("date=") and e.name[5:] >= self.first_day and e.is_dir()
            ]
        except FileNotFoundError:
            return
        for day in sorted(day_entries, key=lambda e: e.name):
            try:
                hosts = sorted(os.scandir(day.path), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for host in hosts:
                if not host.name.startswith("host="):
                    continue
                if self.host_dir is not None and host.name != self.host_dir:
                    continue
                try:
                    names = sorted(os.scandir(host.path), key=lambda e: e.name)
                except FileNotFoundError:
                    continue
                for entry in names:
                    if entry.name.endswith(".jsonl") and not entry.name.startswith((".", "_")):
                        try:
                            yield Path(entry.path), entry.stat()
                        except FileNotFoundError:
                            continue

    def poll(self) -> list[dict[str, Any]]:
        """The complete records appended since the last poll, in timestamp order."""
        out: list[dict[str, Any]] = []
        seen: set[Path] = set()
        for path, st in self._scan():
            seen.add(path)
            watched = self.files.get(path)
            if watched is None or watched.inode != st.st_ino or st.st_size < watched.offset:
                # New file, or one replaced or truncated in place: read it from the start.
                watched = self.files[path] = _Watched(offset=0, inode=st.st_ino)
            if st.st_size > watched.offset:
                self._read(path, watched, out)
        for gone in set(self.files) - seen:  # compressed or removed by retention
            del self.files[gone]
        out.sort(key=lambda r: str(r.get("timestamp") or ""))
        return out

    def _read(self, path: Path, watched: _Watched, out: list[dict[str, Any]]) -> None:
        try:
            with open(path, "rb") as handle:
                handle.seek(watched.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        watched.offset += len(data)
        lines = (watched.pending + data).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if watched.skipping:
                watched.skipping = False
                continue
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.bad_lines += 1
                continue
            if isinstance(value, dict):
                out.append(value)
        if len(tail) > _MAX_PENDING:
            watched.skipping, tail = True, b""
        watched.pending = tail


def _matches(flt: RecordFilter, record: Mapping[str, Any]) -> bool:
    if flt.model is not None and record.get("model") != flt.model:
        return False
    if flt.errors_only and record.get("error") is None:
        return False
    return flt.matches(record)


def tail(
    root: Path,
    flt: RecordFilter,
    *,
    count: int = 20,
    follow: bool = False,
    interval: float = 0.5,
    out: TextIO,
    render: Callable[[Mapping[str, Any]], str],
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Print the last `count` records, then (`follow`) new ones until `stop()` or Ctrl-C."""
    # Offsets are taken before the history is read, so nothing written in between is missed;
    # what the history already showed is not shown again.
    follower = Follower(root, host=flt.host) if follow else None
    history = last_records(root, flt, count)
    for record in history:
        out.write(render(record) + "\n")
    out.flush()
    if follower is None:
        return 0
    shown = {r.get("request_id") for r in history}
    while not stop():
        for record in follower.poll():
            if record.get("request_id") in shown:
                shown.discard(record.get("request_id"))
                continue
            if _matches(flt, record):
                out.write(render(record) + "\n")
        out.flush()
        time.sleep(interval)
    return 0
