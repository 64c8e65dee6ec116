"""Compaction for analytics: closed days' JSONL turned into Parquet, one file per partition.

`vllm-mw compact [--date D]` (needs the `[analytics]` extra: DuckDB). Each `date=D/host=H/`
directory whose files have all been unchanged for `min_age_s` (writers close idle files and never
append to them again) is rebuilt as `compacted-<token>.parquet` holding:

- `record`: every record's JSON exactly as it was written (readers give back the same records),
- typed columns for queries: `timestamp` (TIMESTAMPTZ, microseconds), `request_id`, `model`,
  `endpoint`, `status_code`, `latency_ms`, `ttft_ms`, `is_error`, `stream`, `prompt_tokens`,
  `completion_tokens` (`date` and `host` come from the hive path, as for the JSONL).

Written to a hidden staging directory beside the partition, counted against the sources, then
swapped with the partition directory in one `renameat2(RENAME_EXCHANGE)`: a reader lists either
the JSONL files or the Parquet file, never both, never neither. The swapped-out JSONL is checked
(a file added or changed meanwhile swaps everything back) and removed. Where the exchange is not
available (not Linux, or a file system without it) nothing is compacted.

A late record for a compacted day lands in a new JSONL file beside the Parquet file; readers
read both (`iter_logs`, DuckDB over `*.jsonl` and `*.parquet`); compacting the day again folds
it in. A torn or undecodable line is not carried over: it is counted in `dropped_lines`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._exceptions import ConfigurationError, LogReadError
from ._partition import fsync_dir, is_valid_date

__all__ = ["CompactResult", "check_duckdb", "compact_tree", "iter_compacted"]

PARQUET_PREFIX = "compacted-"
_JSONL = (".jsonl", ".jsonl.gz")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_READ_BATCH = 4096


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise ConfigurationError(
            "Parquet needs DuckDB: pip install 'vllm-middleware[analytics]'"
        ) from None
    return duckdb


def check_duckdb() -> None:
    """ConfigurationError unless DuckDB (the `[analytics]` extra) is installed."""
    _duckdb()


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        raise OSError("renameat2 is not available on this system") from None
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 exchange {a} <-> {b}: {os.strerror(err)}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join(_quote(str(p)) for p in paths) + "]"


# One column per whole line: a delimiter and quote that never occur in JSON text (control
# characters are always escaped in JSON strings), and lines as long as a record may be.
_LINES = (
    "read_csv({files}, columns={{'line': 'VARCHAR'}}, header=false, delim='\\x01', quote='',"
    " escape='', auto_detect=false, max_line_size=134217728, strict_mode=false,"
    " null_padding=false)"
)
# The typed columns: each record's JSON parsed once, into a struct (non-strict: a field of an
# unexpected type becomes NULL, the record itself is kept whole in `record`).
_SHAPE = (
    '{"timestamp": "VARCHAR", "request_id": "VARCHAR", "model": "VARCHAR",'
    ' "endpoint": "VARCHAR", "status_code": "INTEGER", "latency_ms": "DOUBLE",'
    ' "ttft_ms": "DOUBLE", "error": "JSON", "stream": "BOOLEAN",'
    ' "usage": {"prompt_tokens": "BIGINT", "completion_tokens": "BIGINT"}}'
)
_TYPED = """
  SELECT
    record,
    TRY_CAST(r.timestamp AS TIMESTAMPTZ) AS "timestamp",
    r.request_id, r.model, r.endpoint, r.status_code, r.latency_ms, r.ttft_ms,
    coalesce(r.error IS NOT NULL AND r.error::VARCHAR <> 'null', false) AS is_error,
    r.stream,
    r.usage.prompt_tokens AS prompt_tokens,
    r.usage.completion_tokens AS completion_tokens
  FROM (SELECT record, json_transform(record, '{shape}') AS r FROM ({source}))
"""


@dataclass
class PartitionSources:
    directory: Path
    jsonl: list[Path]
    parquet: list[Path]
    snapshot: dict[str, tuple[int, float]]  # name -> (size, mtime) of every file in it


@dataclass
class CompactResult:
    compacted: list[str] = field(default_factory=list)  # "date=D/host=H"
    records: int = 0
    source_files: int = 0
    source_bytes: int = 0
    parquet_bytes: int = 0
    dropped_lines: int = 0
    skipped: list[str] = field(default_factory=list)  # with the reason
    errors: list[str] = field(default_factory=list)


def _snapshot(directory: Path) -> dict[str, tuple[int, float]]:
    shot = {}
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            stat = path.lstat()
            shot[path.name] = (stat.st_size, stat.st_mtime)
    return shot


def _sources(directory: Path) -> PartitionSources:
    names = sorted(p for p in directory.iterdir() if not p.name.startswith((".", "_")))
    jsonl = [p for p in names if p.name.endswith(_JSONL) and p.is_file()]
    plain = {p.name for p in jsonl}
    # `X.jsonl` beside `X.jsonl.gz`: a compression in place not finished; same records (as
    # the reader, read the plain one only).
    jsonl = [p for p in jsonl if not (p.name.endswith(".gz") and p.name[:-3] in plain)]
    parquet = [p for p in names if p.name.startswith(PARQUET_PREFIX) and p.suffix == ".parquet"]
    return PartitionSources(directory, jsonl, parquet, _snapshot(directory))


def _closed_days(root: Path, only: str | None, today: str) -> list[Path]:
    days = []
    for entry in sorted(root.iterdir()):
        day = entry.name[5:]
        if not (entry.name.startswith("date=") and entry.is_dir() and is_valid_date(day)):
            continue
        if (only is None and day < today) or day == only:
            days.append(entry)
    return days


def compact_tree(
    log_dir: str | os.PathLike[str],
    *,
    day: str | None = None,
    min_age_s: float = 3600.0,
    now: float | None = None,
) -> CompactResult:
    """Compact every closed day (before today, UTC), or only `day` (YYYY-MM-DD)."""
    duckdb = _duckdb()
    if day is not None and not is_valid_date(day):
        raise ConfigurationError(f"date must be YYYY-MM-DD, not {day!r}")
    root = Path(log_dir)
    if not root.is_dir():
        raise LogReadError(f"log directory {str(root)!r} does not exist")
    clock = time.time() if now is None else now
    today = datetime.now(UTC).date().isoformat()
    result = CompactResult()
    con = duckdb.connect()
    try:
        for day_dir in _closed_days(root, day, today):
            for part in sorted(p for p in day_dir.iterdir() if p.name.startswith("host=")):
                label = f"{day_dir.name}/{part.name}"
                sources = _sources(part)
                if not sources.jsonl:
                    continue  # nothing new since the last compaction
                newest = max((m for _, m in sources.snapshot.values()), default=0.0)
                if clock - newest < min_age_s:
                    result.skipped.append(f"{label}: changed within {min_age_s:g} s")
                    continue
                try:
                    _compact_partition(con, sources, label, result)
                except (OSError, duckdb.Error) as exc:
                    result.errors.append(f"{label}: {exc}")
    finally:
        con.close()
    return result


def _compact_partition(
    con: Any, sources: PartitionSources, label: str, result: CompactResult
) -> None:
    part = sources.directory
    token = os.urandom(4).hex()
    staging = part.with_name(f".compact-{part.name}-{token}")
    staging.mkdir()
    target = staging / f"{PARQUET_PREFIX}{token}.parquet"
    try:
        selects = []
        if sources.jsonl:
            selects.append(
                f"SELECT line AS record FROM {_LINES.format(files=_sql_list(sources.jsonl))}"
            )
        if sources.parquet:
            selects.append(f"SELECT record FROM read_parquet({_sql_list(sources.parquet)})")
        everything = " UNION ALL ".join(selects)
        nonblank = "trim(record) <> ''"
        lines, expected = con.execute(
            f"SELECT count(*) FILTER (WHERE {nonblank}),"
            f" count(*) FILTER (WHERE {nonblank} AND json_valid(record)) FROM ({everything})"
        ).fetchone()
        valid = f"SELECT record FROM ({everything}) WHERE json_valid(record) AND trim(record) <> ''"
        query = _TYPED.format(source=valid, shape=_SHAPE)
        con.execute(
            f"COPY ({query}) TO {_quote(str(target))} (FORMAT parquet, COMPRESSION zstd,"
            " ROW_GROUP_SIZE 122880)"
        )
        written = con.execute(
            f"SELECT count(*) FROM read_parquet({_quote(str(target))})"
        ).fetchone()[0]
        if written != expected:
            raise OSError(f"wrote {written} records of {expected}; nothing swapped")
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
        fsync_dir(staging)
        _exchange(part, staging)  # the partition is now the Parquet file; staging the JSONL
        if _snapshot(staging) != sources.snapshot:
            # A writer added or changed a file between the scan and the swap: undo, retry later.
            _exchange(part, staging)
            result.skipped.append(f"{label}: changed during compaction, kept as it was")
            with contextlib.suppress(OSError):
                target.unlink()
                staging.rmdir()  # left in place if a writer put something there meanwhile
            return
        fsync_dir(part.parent)
        result.compacted.append(label)
        result.records += int(written)
        result.dropped_lines += int(lines) - int(expected)
        result.source_files += len(sources.jsonl)
        result.source_bytes += sum(sources.snapshot[p.name][0] for p in sources.jsonl)
        result.parquet_bytes += (part / target.name).stat().st_size
        shutil.rmtree(staging)
    except BaseException:
        if staging.exists() and not any(p.suffix != ".parquet" for p in staging.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
        raise


def iter_compacted(path: Path) -> Iterator[bytes]:
    """The records of one compacted Parquet file, as the JSON bytes they were written as."""
    duckdb = _duckdb()
    con = duckdb.connect()
    try:
        cursor = con.execute(f"SELECT record FROM read_parquet({_quote(str(path))})")
        while rows := cursor.fetchmany(_READ_BATCH):
            for (record,) in rows:
                yield record.encode()
    except duckdb.Error as exc:
        raise LogReadError(f"cannot read {path}: {exc}") from exc
    finally:
        con.close()
