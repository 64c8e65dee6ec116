"""Reading the log tree back: `iter_logs` streams records in constant memory; `load_logs` lists.

Reads what the writers produce (`date=*/host=*/*.jsonl`, pretty `*.json`, and their `.gz`
forms) plus flat files in `log_dir` itself, as the original single-process tool left them.
A torn last line (a writer that crashed mid-write) is skipped and counted, never fatal.
"""

from __future__ import annotations

import gc
import gzip
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from ._compact import iter_compacted
from ._exceptions import ConfigurationError, LogReadError
from ._media import restore_media_refs
from ._partition import sanitize_partition_value
from ._record import LogRecord

__all__ = ["DateLike", "ReadStats", "iter_log_files", "iter_logs", "load_logs"]

logger = logging.getLogger("vllm_middleware")

DateLike = str | date | datetime

_CHUNK = 4 * 1024 * 1024
# `.parquet`: days compacted by `vllm-mw compact` (`_compact.py`), read back record by record.
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclass
class ReadStats:
    """What a read pass met besides good records (pass one to `iter_logs` to collect it)."""

    files: int = 0
    records: int = 0
    torn_tails: int = 0
    bad_lines: int = 0
    media_restored: int = 0  # media references replaced by their data (restore_media=True)
    media_missing: int = 0  # references left as they are: file not stored, missing or altered


def _normalize_date(value: DateLike | None, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    text = value.strip()
    digits = text.replace("-", "")
    if len(digits) == 8 and digits.isdigit():
        normalized = f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"
        try:
            date.fromisoformat(normalized)
        except ValueError:
            pass
        else:
            return normalized
    raise ConfigurationError(f"{name} must be YYYYMMDD or YYYY-MM-DD, not {value!r}")


def _is_log_file(name: str) -> bool:
    return not name.startswith((".", "_")) and name.endswith(_SUFFIXES)


def iter_log_files(
    log_dir: str | os.PathLike[str],
    *,
    start_date: DateLike | None = None,
    end_date: DateLike | None = None,
    host: str | None = None,
) -> Iterator[Path]:
    """Log files under `log_dir` in (date, host, name) order, pruned by partition."""
    root = Path(log_dir)
    if not root.is_dir():
        raise LogReadError(f"log directory {str(root)!r} does not exist")
    lo = _normalize_date(start_date, "start_date")
    hi = _normalize_date(end_date, "end_date")
    want_host = f"host={sanitize_partition_value(host)}" if host is not None else None
    flat: list[Path] = []
    dates: list[tuple[str, Path]] = []
    with os.scandir(root) as it:
        for entry in it:
            if entry.is_dir() and entry.name.startswith("date="):
                day = entry.name[5:]
                if (lo is None or day >= lo) and (hi is None or day <= hi):
                    dates.append((day, Path(entry.path)))
            elif entry.is_file() and _is_log_file(entry.name):
                flat.append(Path(entry.path))
    if host is None:
        yield from sorted(flat)  # legacy flat files: filtered per record below
    for _, day_dir in sorted(dates):
        for host_dir in sorted(p for p in day_dir.iterdir() if p.name.startswith("host=")):
            if want_host is not None and host_dir.name != want_host:
                continue
            yield from sorted(p for p in host_dir.iterdir() if _is_log_file(p.name))


def _open(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=0)


def _split_jsonl(buffer: bytes) -> tuple[list[bytes], bytes]:
    lines = buffer.split(b"\n")
    return lines[:-1], lines[-1]


def _split_pretty(buffer: bytes) -> tuple[list[bytes], bytes]:
    # Pretty records end with a line holding only "}" (nested lines are indented).
    docs: list[bytes] = []
    start = 0
    while True:
        end = buffer.find(b"\n}\n", start)
        if end < 0:
            break
        docs.append(buffer[start : end + 2])
        start = end + 3
    return docs, buffer[start:]


def _iter_raw(path: Path, stats: ReadStats) -> Iterator[bytes]:
    """Raw JSON documents of one file; a torn tail is dropped and counted."""
    if path.name.endswith(".parquet"):
        yield from iter_compacted(path)
        return
    splitter = _split_pretty if path.name.endswith((".json", ".json.gz")) else _split_jsonl
    rest = b""
    try:
        with _open(path) as handle:
            while True:
                chunk = handle.read(_CHUNK)
                if not chunk:
                    break
                docs, rest = splitter(rest + chunk if rest else chunk)
                yield from docs
    except (OSError, EOFError) as exc:
        # EOFError: a gzip file cut short; what was read is kept, the rest counted as torn.
        if isinstance(exc, EOFError) or path.name.endswith(".gz"):
            stats.torn_tails += 1
            return
        raise LogReadError(f"cannot read {path}: {exc}") from exc
    if rest.strip():
        try:
            orjson.loads(rest)
        except orjson.JSONDecodeError:
            stats.torn_tails += 1
            logger.warning("skipped a torn last record in %s (%d bytes)", path, len(rest))
        else:
            yield rest


def iter_logs(
    log_dir: str | os.PathLike[str] = "./logs/vllm",
    start_date: DateLike | None = None,
    end_date: DateLike | None = None,
    *,
    host: str | None = None,
    model: str | None = None,
    errors_only: bool = False,
    stats: ReadStats | None = None,
    restore_media: bool = False,
    media_dir: str | os.PathLike[str] | None = None,
) -> Iterator[LogRecord]:
    """Stream records from the log tree in constant memory.

    Dates are inclusive and accept `YYYYMMDD` or `YYYY-MM-DD` (the UTC date of the record).
    `host` and dates prune whole partitions; `model` and `errors_only` filter records.
    `restore_media` puts the data of each `media_ref` back in its place and shape, from the
    files under `media_dir` (default `log_dir/media`); missing files leave the reference.
    """
    lo = _normalize_date(start_date, "start_date")
    hi = _normalize_date(end_date, "end_date")
    counts = stats if stats is not None else ReadStats()
    root = Path(log_dir)
    media_root = Path(media_dir) if media_dir is not None else root / "media"
    for path in iter_log_files(root, start_date=lo, end_date=hi, host=host):
        counts.files += 1
        flat = path.parent == root
        for raw in _iter_raw(path, counts):
            if not raw.strip():
                continue
            try:
                data: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                counts.bad_lines += 1
                logger.warning("skipped an undecodable record in %s", path)
                continue
            if not isinstance(data, dict):
                counts.bad_lines += 1
                continue
            if model is not None and data.get("model") != model:
                continue
            if errors_only and data.get("error") is None:
                continue
            if flat and (lo or hi) and not _in_range(data.get("timestamp"), lo, hi):
                continue
            if restore_media and b'"media_ref":' in raw:
                restore_media_refs(data, media_root, counts)
            counts.records += 1
            yield LogRecord(data)


def _in_range(timestamp: Any, lo: str | None, hi: str | None) -> bool:
    if not isinstance(timestamp, str) or len(timestamp) < 10:
        return False
    day = timestamp[:10]
    return (lo is None or day >= lo) and (hi is None or day <= hi)


def load_logs(
    log_dir: str | os.PathLike[str] = "./logs/vllm",
    start_date: DateLike | None = None,
    end_date: DateLike | None = None,
    *,
    host: str | None = None,
    model: str | None = None,
    errors_only: bool = False,
    stats: ReadStats | None = None,
    restore_media: bool = False,
    media_dir: str | os.PathLike[str] | None = None,
) -> list[LogRecord]:
    """All matching records as a list (see `iter_logs` for the streaming form)."""
    records = iter_logs(
        log_dir,
        start_date,
        end_date,
        host=host,
        model=model,
        errors_only=errors_only,
        stats=stats,
        restore_media=restore_media,
        media_dir=media_dir,
    )
    # Millions of parsed dicts, none of them cyclic: the cycle collector would rescan the
    # growing list again and again (measured: 5x slower). Pause it for the load only.
    paused = gc.isenabled()
    gc.disable()
    try:
        return list(records)
    finally:
        if paused:
            gc.enable()
