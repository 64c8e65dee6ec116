"""Reading the log tree back: `iter_logs` streams records in constant memory; `load_logs` lists.

Reads what the writers produce (`date=*/host=*/*.jsonl`, pretty `*.json`, and their `.gz`
forms) plus flat files in `log_dir` itself, as the original single-process tool left them.
A torn last line (a writer that crashed mid-write) is skipped and counted, never fatal.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

import orjson

from ._exceptions import ConfigurationError
from ._media_files import restore_media_refs
from ._partition import sanitize_partition_value
from ._read_files import DEFAULT_MAX_LINE_BYTES, ReadStats, iter_documents, list_log_files
from ._record import LogRecord

__all__ = ["DateLike", "ReadStats", "iter_dicts", "iter_log_files", "iter_logs", "load_logs"]

logger = logging.getLogger("vllm_middleware")

DateLike = str | date | datetime


def _normalize_date(value: DateLike | None, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if not isinstance(value, str):
        raise ConfigurationError(
            f"{name} must be a str (YYYYMMDD or YYYY-MM-DD), a date or a datetime, "
            f"not {type(value).__name__} {value!r}"
        )
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


def _date_range(start: DateLike | None, end: DateLike | None) -> tuple[str | None, str | None]:
    lo = _normalize_date(start, "start_date")
    hi = _normalize_date(end, "end_date")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigurationError(f"start_date {lo} is after end_date {hi}: no day can match")
    return lo, hi


def iter_log_files(
    log_dir: str | os.PathLike[str],
    *,
    start_date: DateLike | None = None,
    end_date: DateLike | None = None,
    host: str | None = None,
    follow_symlinks: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Path]:
    """Regular log files under `log_dir` in (date, host, name) order, pruned by partition.

    Symbolic links (to files or partition folders) are skipped unless `follow_symlinks`;
    entries named like log files that are not regular files are skipped; both are counted in
    `stats`.
    """
    lo, hi = _date_range(start_date, end_date)
    want_host = f"host={sanitize_partition_value(host)}" if host is not None else None
    counts = stats if stats is not None else ReadStats()
    return list_log_files(
        Path(log_dir), lo, hi, want_host, follow_symlinks=follow_symlinks, stats=counts
    )


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
    follow_symlinks: bool = False,
    max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[LogRecord]:
    """Stream records from the log tree in constant memory.

    Dates are inclusive and accept `YYYYMMDD` or `YYYY-MM-DD` (the UTC date of the record).
    `host` and dates prune whole partitions; `model` and `errors_only` filter records.
    `restore_media` puts the data of each `media_ref` back in its place and shape, from the
    files under `media_dir` (default `log_dir/media`); a reference whose file is missing, or
    that fails a safety check (see `ReadStats`), is left as it is.

    Only regular files are read; symbolic links are skipped unless `follow_symlinks`.
    Records longer than `max_line_bytes` (None: no limit) are skipped. What was skipped is
    counted in `stats`.
    """
    return _records(
        log_dir,
        start_date,
        end_date,
        host,
        model,
        errors_only,
        stats,
        restore_media,
        media_dir,
        follow_symlinks,
        max_line_bytes,
        wrap=True,
    )


def iter_dicts(
    log_dir: str | os.PathLike[str],
    start_date: DateLike | None = None,
    end_date: DateLike | None = None,
    *,
    host: str | None = None,
    model: str | None = None,
    errors_only: bool = False,
    stats: ReadStats | None = None,
    restore_media: bool = False,
) -> Iterator[dict[str, Any]]:
    """`iter_logs`' records as the parsed dicts themselves, for the tools that convert every
    record (`export`): no `LogRecord` made and unwrapped per record."""
    return _records(
        log_dir,
        start_date,
        end_date,
        host,
        model,
        errors_only,
        stats,
        restore_media,
        None,
        False,
        DEFAULT_MAX_LINE_BYTES,
        wrap=False,
    )


def _records(
    log_dir: str | os.PathLike[str],
    start_date: DateLike | None,
    end_date: DateLike | None,
    host: str | None,
    model: str | None,
    errors_only: bool,
    stats: ReadStats | None,
    restore_media: bool,
    media_dir: str | os.PathLike[str] | None,
    follow_symlinks: bool,
    max_line_bytes: int | None,
    *,
    wrap: bool,
) -> Iterator[Any]:
    # A generator: arguments are checked on the first `next`, as they always were.
    lo, hi = _date_range(start_date, end_date)
    if max_line_bytes is not None and max_line_bytes <= 0:
        raise ConfigurationError(f"max_line_bytes must be positive or None, not {max_line_bytes}")
    counts = stats if stats is not None else ReadStats()
    root = Path(log_dir)
    media_root = Path(media_dir) if media_dir is not None else root / "media"
    files = iter_log_files(
        root, start_date=lo, end_date=hi, host=host, follow_symlinks=follow_symlinks, stats=counts
    )
    for path in files:
        counts.files += 1
        flat = path.parent == root
        documents = iter_documents(
            path, follow_symlinks=follow_symlinks, max_line_bytes=max_line_bytes, stats=counts
        )
        for raw in documents:
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
            yield LogRecord(data) if wrap else data


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
    follow_symlinks: bool = False,
    max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES,
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
        follow_symlinks=follow_symlinks,
        max_line_bytes=max_line_bytes,
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
