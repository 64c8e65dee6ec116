"""SQL over the log tree with DuckDB (the `[analytics]` extra): the `logs` view, `vllm-mw query`.

The view is defined here once, for every tool that queries the tree. JSONL files are read with
an explicit column list, so records of any age and shape read alike: scalar fields typed,
nested ones (`messages`, `response`, `metadata`, ...) as DuckDB `JSON` (`metadata->>'app'`).
`date` and `host` come from the partition layout (hive partitioning), so filters on them prune
whole folders. Where a `date=` folder holds Parquet files (compacted days) they are read too,
projected onto the same columns, and the two are unioned by name.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from ._exceptions import ConfigurationError, LogReadError, QueryError

__all__ = [
    "COLUMNS",
    "connect",
    "duckdb_module",
    "files_sql",
    "logs_view_sql",
    "run_query",
    "write_result",
]

#: The record's columns as the `logs` view types them (besides `date` and `host`).
COLUMNS: dict[str, str] = {
    "timestamp": "VARCHAR",
    "request_id": "VARCHAR",
    "model": "VARCHAR",
    "messages": "JSON",
    "prompt": "JSON",
    "response": "JSON",
    "parameters": "JSON",
    "latency_ms": "DOUBLE",
    "error": "VARCHAR",
    "metadata": "JSON",
    "schema_version": "INTEGER",
    "endpoint": "VARCHAR",
    "status_code": "INTEGER",
    "usage": "JSON",
    "stream": "BOOLEAN",
    "ttft_ms": "DOUBLE",
    "error_detail": "JSON",
    "client_request_id": "VARCHAR",
    "chunks": "INTEGER",
    "stream_end": "VARCHAR",
}
# Columns computed from the record for convenience (and for the report).
_DERIVED = (
    'CAST("timestamp" AS TIMESTAMPTZ) AS ts',
    "CAST(usage->>'prompt_tokens' AS BIGINT) AS input_tokens",
    "CAST(usage->>'completion_tokens' AS BIGINT) AS output_tokens",
    "response->'choices'->0->>'finish_reason' AS finish_reason",
)
# Partition values as they are written: a host named "007" stays text, never the number 7.
_HIVE_TYPES = "{'date': 'DATE', 'host': 'VARCHAR'}"
_MAX_OBJECT = 64 * 1024 * 1024  # a record the writers accept (VLLM_MW_MAX_RECORD_BYTES)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _present(root: Path) -> tuple[set[str], bool]:
    """Which JSONL suffixes occur in the tree, and whether any Parquet file does."""
    suffixes: set[str] = set()
    parquet = False
    with os.scandir(root) as days:
        for day in days:
            if not (day.name.startswith("date=") and day.is_dir()):
                continue
            for dirpath, _dirs, files in os.walk(day.path):
                del dirpath
                for name in files:
                    if name.startswith((".", "_")):
                        continue
                    if name.endswith(".jsonl"):
                        suffixes.add(".jsonl")
                    elif name.endswith(".jsonl.gz"):
                        suffixes.add(".jsonl.gz")
                    elif name.endswith(".parquet"):
                        parquet = True
            if len(suffixes) == 2 and parquet:
                break
    return suffixes, parquet


# The file each row of the JSONL part came from (DuckDB's `filename=`), dropped from the view.
_FILE_COLUMN = "_vllm_mw_file"


def _read_json(sources: Sequence[str], file_column: str | None) -> str:
    columns = ", ".join(f"{_literal(name)}: {_literal(kind)}" for name, kind in COLUMNS.items())
    return (
        f"read_json([{', '.join(_literal(s) for s in sources)}], format='newline_delimited', "
        f"columns={{{columns}}}, hive_partitioning=true, hive_types={_HIVE_TYPES}, "
        "union_by_name=true, "
        + (f"filename={_literal(file_column)}, " if file_column else "")
        + f"ignore_errors=true, maximum_object_size={_MAX_OBJECT})"
    )


def _jsonl_sql(root: Path, suffixes: set[str]) -> str:
    globs = [str(root / "date=*" / "host=*" / f"*{s}") for s in sorted(suffixes)]
    both = len(suffixes) == 2
    source = _read_json(globs, _FILE_COLUMN if both else None)
    if not both:
        return f"SELECT * FROM {source}"
    # `X.jsonl` beside `X.jsonl.gz` (a compression in place not finished, `_compress.py`):
    # the same records; read the plain file only, as `iter_logs` does. Checked when the query
    # runs (the globs are expanded then too), on the compressed files' rows only.
    plain = _literal(str(root / "date=*" / "host=*" / "*.jsonl"))
    file = _quote(_FILE_COLUMN)
    return (
        f"SELECT * EXCLUDE ({file}) FROM {source} WHERE NOT ({file} LIKE '%.gz' AND "
        f"left({file}, length({file}) - 3) IN (SELECT file FROM glob({plain})))"
    )


# Columns `vllm-mw compact` stores typed beside each record's JSON (`_compact`).
_COMPACT_TYPED = ("request_id", "model", "endpoint", "status_code", "latency_ms", "ttft_ms")


def _parquet_sql(con: Any, sources: Sequence[str], file_column: str | None = None) -> str:
    source = (
        f"read_parquet([{', '.join(_literal(s) for s in sources)}], "
        f"hive_partitioning=true, hive_types={_HIVE_TYPES}, union_by_name=true"
        + (f", filename={_literal(file_column)})" if file_column else ")")
    )
    have = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    picks = []
    derived: list[str] = []  # after date and host, as in the JSONL part
    if "record" in have:
        # Compacted days: the record's JSON as written, typed copies of the hot columns.
        for name, kind in COLUMNS.items():
            if name in _COMPACT_TYPED and name in have:
                picks.append(f"CAST({_quote(name)} AS {kind}) AS {_quote(name)}")
            elif kind == "JSON":
                value = f"json_extract(record, {_literal('$.' + name)})"
                picks.append(
                    f"CASE WHEN json_type({value}) = 'NULL' THEN NULL ELSE {value} END "
                    f"AS {_quote(name)}"
                )
            else:
                value = f"json_extract_string(record, {_literal('$.' + name)})"
                picks.append(f"TRY_CAST({value} AS {kind}) AS {_quote(name)}")
        typed_ts = "timestamp" in have and "record" in have
        derived.append(
            'CAST("timestamp" AS TIMESTAMPTZ) AS ts'
            if typed_ts
            else "TRY_CAST(json_extract_string(record, '$.timestamp') AS TIMESTAMPTZ) AS ts"
        )
        for column, typed, path in (
            ("input_tokens", "prompt_tokens", "$.usage.prompt_tokens"),
            ("output_tokens", "completion_tokens", "$.usage.completion_tokens"),
        ):
            derived.append(
                f"CAST({typed} AS BIGINT) AS {column}"
                if typed in have
                else f"TRY_CAST(json_extract_string(record, '{path}') AS BIGINT) AS {column}"
            )
        derived.append(
            "json_extract_string(record, '$.response.choices[0].finish_reason') AS finish_reason"
        )
    else:  # other Parquet: the columns it has, NULL for the rest
        for name, kind in COLUMNS.items():
            picks.append(
                f"TRY_CAST({_quote(name)} AS {kind}) AS {_quote(name)}"
                if name in have
                else f"CAST(NULL AS {kind}) AS {_quote(name)}"
            )
        derived += [column.replace("CAST(", "TRY_CAST(", 1) for column in _DERIVED]
    picks.append("date" if "date" in have else "CAST(NULL AS DATE) AS date")
    picks.append("CAST(host AS VARCHAR) AS host" if "host" in have else "NULL::VARCHAR AS host")
    picks += derived
    if file_column:
        picks.append(_quote(file_column))
    return f"SELECT {', '.join(picks)} FROM {source}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def logs_view_sql(con: Any, root: str | os.PathLike[str]) -> str:
    """`CREATE VIEW logs AS ...` for the tree at `root` (JSONL and Parquet days together)."""
    path = Path(root).resolve()
    if not path.is_dir():
        raise LogReadError(f"log directory {str(path)!r} does not exist")
    suffixes, parquet = _present(path)
    parts = []
    if suffixes:
        parts.append(f"SELECT *, {', '.join(_DERIVED)} FROM ({_jsonl_sql(path, suffixes)})")
    if parquet:
        parts.append(_parquet_sql(con, [str(path / "date=*" / "**" / "*.parquet")]))
    if not parts:  # an empty tree still has a (typed, empty) view
        empty = ", ".join(f"CAST(NULL AS {k}) AS {_quote(n)}" for n, k in COLUMNS.items())
        parts.append(
            f"SELECT *, {', '.join(_DERIVED)} FROM (SELECT {empty}, CAST(NULL AS DATE) AS date, "
            "NULL::VARCHAR AS host LIMIT 0)"
        )
    body = " UNION ALL BY NAME ".join(f"({part})" for part in parts)
    return f"CREATE OR REPLACE VIEW logs AS {body}"


def files_sql(con: Any, files: Sequence[Path], file_column: str) -> str:
    """The `logs` view's rows of these files only (as listed by `iter_log_files`), each row
    with the path it came from in `file_column`: for tools that prune the tree themselves.

    The caller lists the files, so a `X.jsonl.gz` beside its `X.jsonl` is already left out.
    """
    jsonl = [str(f) for f in files if not f.name.endswith(".parquet")]
    parquet = [str(f) for f in files if f.name.endswith(".parquet")]
    parts = []
    if jsonl:
        parts.append(f"SELECT *, {', '.join(_DERIVED)} FROM {_read_json(jsonl, file_column)}")
    if parquet:
        parts.append(_parquet_sql(con, parquet, file_column))
    if not parts:
        raise QueryError("no files to read")
    return " UNION ALL BY NAME ".join(f"({part})" for part in parts)


def duckdb_module() -> Any:
    """The `duckdb` module, or a `ConfigurationError` naming the extra to install."""
    try:
        import duckdb
    except ImportError:
        raise ConfigurationError(
            "querying the logs needs DuckDB: pip install 'vllm-middleware[analytics]'"
        ) from None
    return duckdb


def connect(root: str | os.PathLike[str]) -> Any:
    """An in-memory DuckDB connection with the `logs` view over the tree at `root`."""
    duckdb = duckdb_module()
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    try:
        con.execute(logs_view_sql(con, root))
    except duckdb.Error as exc:
        con.close()
        raise QueryError(f"cannot read the log tree: {_first_line(exc)}") from None
    return con


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Result:
    """A query's column names and types, and its rows fetched in batches (constant memory)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        description = cursor.description or []
        self.columns: list[str] = [d[0] for d in description]
        self.json_columns = {i for i, d in enumerate(description) if str(d[1]) == "JSON"}

    def rows(self, batch: int = 2048) -> Iterator[tuple[Any, ...]]:
        duckdb = duckdb_module()
        while True:
            try:
                chunk = self._cursor.fetchmany(batch)
            except duckdb.Error as exc:
                raise QueryError(_first_line(exc)) from None
            if not chunk:
                return
            yield from chunk


def run_query(root: str | os.PathLike[str], sql: str) -> Result:
    """Run `sql` against the `logs` view of the tree; errors are `QueryError`s, one line each."""
    duckdb = duckdb_module()
    con = connect(root)
    try:
        cursor = con.execute(sql)
    except duckdb.Error as exc:
        raise QueryError(_first_line(exc)) from None
    return Result(cursor)


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return value


def _json_value(value: Any, is_json: bool) -> Any:
    if is_json and isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return _plain(value)


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(_plain(value))
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def write_result(
    result: Result, out: TextIO, fmt: str = "table", *, max_rows: int = 1000, width: int = 60
) -> int:
    """Write the rows as a table, CSV, JSON (an array) or JSON lines; returns the row count."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.columns)
        for row in result.rows():
            writer.writerow(["" if v is None else _plain(v) for v in row])
            count += 1
        return count
    if fmt in ("json", "jsonl"):
        out.write("[" if fmt == "json" else "")
        for row in result.rows():
            item = {
                name: _json_value(value, i in result.json_columns)
                for i, (name, value) in enumerate(zip(result.columns, row, strict=True))
            }
            line = orjson.dumps(item, default=str).decode()
            if fmt == "json":
                out.write(("," if count else "") + "\n" + line)
            else:
                out.write(line + "\n")
            count += 1
        out.write("\n]\n" if fmt == "json" else "")
        return count
    if fmt != "table":
        raise ConfigurationError(f"unknown output format {fmt!r}: table, csv, json or jsonl")
    # A table needs its column widths first: it shows the first `max_rows` rows.
    rows: list[Sequence[str]] = []
    more = False
    for row in result.rows():
        if len(rows) == max_rows:
            more = True
            break
        rows.append([_cell(v, width) for v in row])
    widths = [len(c) for c in result.columns]
    for cells in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    out.write("  ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for cells in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n")
    shown = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    out.write(f"({shown}{'; more not shown, use --format csv or json' if more else ''})\n")
    return len(rows)
