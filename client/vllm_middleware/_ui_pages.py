"""The viewer's request table over a large tree: keyset pages that read only the files they need.

The order is the `logs` view's `ORDER BY ts DESC NULLS LAST, request_id`. A page starts at a
cursor (the last row of the page before, as a position in that order) and is filled by reading
files newest first: each file's summary (its timestamp range, models and error count, kept in
memory per (path, size, mtime) and recomputed only for files that changed) says which files can
hold rows of the page, and the walk stops as soon as no file left can hold a row that sorts
before the page's last one. A day of JSONL being appended to is read again when its live file
grows; closed files are summarised once. Hosts and days come from the folder names.

Rows are read with DuckDB through the `logs` view's own column definitions (`_query.files_sql`),
so a page holds exactly the rows the plain query over the whole tree would show there.
"""

from __future__ import annotations

import base64
import datetime as dt
import mmap
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson

from ._exceptions import ConfigurationError, QueryError
from ._query import duckdb_module, files_sql
from ._reader import iter_log_files

__all__ = ["Cursor", "Filters", "Page", "TreeIndex", "fetch_page"]

_FILE = "_vllm_mw_file"
# A page's rows are chosen on these (no JSON column is materialised for the rows not shown);
# the shown rows' `messages`, `prompt` and `response` are read afterwards (`_content`).
_ROW_COLUMNS = (
    "request_id, timestamp, CAST(date AS VARCHAR), host, model, status_code, error, latency_ms, "
    f'ttft_ms, input_tokens, output_tokens, "{_FILE}"'
)
_CONTENT = ("messages", "prompt", "response")
_BATCH_FILES = 64
#: Bytes of files one page may read once it has started reading (at least one batch is read).
SCAN_BUDGET = 512 * 1024 * 1024

# A row's place in the order, as a tuple Python sorts the same way:
# (no timestamp, -epoch microseconds, no request id, request id).
Key = tuple[bool, int, bool, str]


def _key(micros: int | None, request_id: str | None) -> Key:
    return (micros is None, -(micros or 0), request_id is None, request_id or "")


@dataclass(frozen=True)
class Cursor:
    """A position in the order: just after the `seen`-th row whose key is `key`."""

    micros: int | None
    request_id: str | None
    seen: int

    @property
    def key(self) -> Key:
        return _key(self.micros, self.request_id)

    def token(self) -> str:
        raw = orjson.dumps([self.micros, self.request_id, self.seen])
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> Cursor | None:
        try:
            micros, rid, seen = orjson.loads(
                base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            )
        except (ValueError, TypeError):
            return None
        if not (micros is None or type(micros) is int) or not (rid is None or isinstance(rid, str)):
            return None
        if type(seen) is not int or seen < 0:
            return None
        return cls(micros, rid, seen)


def _day(value: Any, name: str) -> str:
    text = str(value).strip()
    if not text:
        return ""
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ConfigurationError(f"{name}: not a date (YYYY-MM-DD): {text!r}") from None


@dataclass
class Filters:
    since: str = ""
    until: str = ""
    model: str = ""
    host: str = ""
    status: str = ""  # "", "ok", "error"
    meta: str = ""  # key=value
    q: str = ""
    after: str = ""  # a Cursor's token: the page starts there
    page: int = 1  # shown only; the cursor says where the page is

    @classmethod
    def of(cls, params: Any) -> Filters:
        page = str(params.get("page", "1"))
        return cls(
            since=_day(params.get("since", ""), "since"),
            until=_day(params.get("until", ""), "until"),
            **{k: str(params.get(k, "")).strip() for k in ("model", "host")},
            status=str(params.get("status", "")),
            meta=str(params.get("meta", "")).strip(),
            q=str(params.get("q", "")).strip(),
            after=str(params.get("after", "")),
            # Without a cursor it is the first page, whatever number an old link carries.
            page=max(1, int(page)) if page.isdigit() and params.get("after") else 1,
        )

    def where(self) -> tuple[list[str], list[Any]]:
        """The SQL conditions of the filters (every user value a parameter)."""
        clauses: list[str] = []
        args: list[Any] = []
        if self.since:
            clauses.append("date >= CAST(? AS DATE)")
            args.append(self.since)
        if self.until:
            clauses.append("date <= CAST(? AS DATE)")
            args.append(self.until)
        if self.model:
            clauses.append("model = ?")
            args.append(self.model)
        if self.host:
            clauses.append("host = ?")
            args.append(self.host)
        if self.status == "ok":
            clauses.append("error IS NULL")
        elif self.status == "error":
            clauses.append("error IS NOT NULL")
        if self.meta:
            key, _, value = self.meta.partition("=")
            clauses.append("json_extract_string(metadata, ?) = ?")
            args += ["$." + '"' + key.replace('"', "") + '"', value]
        if self.q:
            clauses.append(
                "(CAST(messages AS VARCHAR) ILIKE ? OR CAST(prompt AS VARCHAR) ILIKE ? "
                "OR CAST(response AS VARCHAR) ILIKE ?)"
            )
            pattern = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%") + "%"
            args += [pattern] * 3
        return clauses, args

    def query(self, **change: Any) -> str:
        values = {**self.__dict__, **change}
        return urlencode({k: v for k, v in values.items() if v not in ("", None, 1) or k == "q"})


@dataclass
class _Stats:
    """One model's rows in one file."""

    rows: int
    errors: int
    newest: int | None  # epoch microseconds
    oldest: int | None
    undated: int  # rows without a (readable) timestamp


@dataclass
class _File:
    path: Path
    day: str
    host: str
    stamp: tuple[int, int]  # (size, mtime_ns) the summary was computed for
    models: dict[str | None, _Stats] = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _day_host(path: Path) -> tuple[str, str]:
    return path.parent.parent.name[5:], path.parent.name[5:]


class TreeIndex:
    """Summaries of the tree's files, refreshed from the folders on each use (thread-safe)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._files: dict[Path, _File] = {}
        self._lock = threading.Lock()

    def connect(self) -> Any:
        con = duckdb_module().connect(":memory:")
        con.execute("SET enable_progress_bar = false")
        return con

    def refresh(self) -> list[_File]:
        """The files of the `logs` view, their summaries up to date."""
        listed: list[tuple[Path, tuple[int, int]]] = []
        for path in iter_log_files(self._root):
            if path.parent == self._root or not path.name.endswith(
                (".jsonl", ".jsonl.gz", ".parquet")
            ):
                continue  # the view reads the partitions' JSONL and Parquet files only
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            listed.append((path, (st.st_size, st.st_mtime_ns)))
        with self._lock:
            stale = [
                (p, stamp)
                for p, stamp in listed
                if p not in self._files or self._files[p].stamp != stamp
            ]
            if stale:
                self._summarise(stale)
            keep = {p for p, _ in listed}
            for gone in [p for p in self._files if p not in keep]:
                del self._files[gone]
            return [self._files[p] for p, _ in listed if p in self._files]

    def _summarise(self, stale: list[tuple[Path, tuple[int, int]]]) -> None:
        fresh = {p: _File(p, *_day_host(p), stamp) for p, stamp in stale}
        con = self.connect()
        try:
            source = files_sql(con, list(fresh), _FILE)
            rows = con.execute(
                f'SELECT "{_FILE}", model, count(*), count(error), max(epoch_us(ts)), '
                f"min(epoch_us(ts)), count(*) - count(ts) FROM ({source}) GROUP BY ALL"
            ).fetchall()
        except duckdb_module().Error as exc:
            raise QueryError(f"cannot read the log tree: {_first_line(exc)}") from None
        finally:
            con.close()
        for name, model, n, errors, newest, oldest, undated in rows:
            fresh[Path(name)].models[model] = _Stats(n, errors, newest, oldest, undated)
        # A file that vanished before it was read, or holds no row, has an empty summary.
        self._files.update(fresh)

    def hosts(self) -> list[str]:
        """The `host=` folders of the tree (no file is read)."""
        found: set[str] = set()
        with os.scandir(self._root) as days:
            for day in days:
                if day.name.startswith("date=") and day.is_dir(follow_symlinks=False):
                    with os.scandir(day.path) as hosts:
                        found.update(
                            h.name[5:]
                            for h in hosts
                            if h.name.startswith("host=") and h.is_dir(follow_symlinks=False)
                        )
        return sorted(found)

    def models(self) -> list[str]:
        """The models of the files as last refreshed (the `logs` view's distinct models)."""
        with self._lock:
            files = list(self._files.values())
        return sorted({m for f in files for m, s in f.models.items() if m is not None and s.rows})


@dataclass
class Page:
    # The _ROW_COLUMNS but the file, then the decoded `messages`, `prompt` and `response`.
    rows: list[tuple[Any, ...]]
    more: bool
    next: Cursor | None  # where the next (older) page starts
    searched_to: str = ""  # the page was cut short: days from this one on are not read yet


def _bounds(f: _File, filters: Filters) -> tuple[Key, Key] | None:
    """(best, worst) timestamp prefix of the rows the filters may take from `f`; None: none."""
    stats = [
        s
        for m, s in f.models.items()
        if not filters.model or m == filters.model
        if (filters.status != "error" or s.errors) and (filters.status != "ok" or s.errors < s.rows)
    ]
    if filters.host and f.host != filters.host:
        return None
    if (filters.since and f.day < filters.since) or (filters.until and f.day > filters.until):
        return None
    dated = [s for s in stats if s.newest is not None]
    if not stats:
        return None
    best = (
        _key(max(s.newest for s in dated if s.newest is not None), None)
        if dated
        else _key(None, None)
    )
    undated = any(s.undated for s in stats)
    worst = (
        _key(None, None)
        if undated
        else _key(min(s.oldest for s in dated if s.oldest is not None), None)
    )
    return best, worst


def _prefix(key: Key) -> tuple[bool, int]:
    return key[0], key[1]


def _after(cursor: Cursor) -> tuple[str, list[Any]]:
    """Rows at or after the cursor's key (those of equal key are skipped by count)."""
    if cursor.request_id is None:
        tail, args = "request_id IS NULL", []
    else:
        tail, args = "(request_id IS NULL OR request_id >= ?)", [cursor.request_id]
    if cursor.micros is None:
        return f"(ts IS NULL AND {tail})", args
    at = cursor.micros
    return f"(ts IS NULL OR epoch_us(ts) < ? OR (epoch_us(ts) = ? AND {tail}))", [at, at, *args]


def fetch_page(index: TreeIndex, filters: Filters, size: int) -> Page:
    """The `size` rows from `filters.after` (or the start) on, reading as few files as it can."""
    cursor = Cursor.parse(filters.after) if filters.after else None
    want = size + 1 + (cursor.seen if cursor else 0)  # +1: is there a page after this one
    files = []
    for f in index.refresh():
        bounds = _bounds(f, filters)
        if bounds is None:
            continue
        if cursor is not None and _prefix(bounds[1]) < _prefix(cursor.key):
            continue  # every row of the file comes before the page
        files.append((bounds, f))
    files.sort(key=lambda item: _prefix(item[0][0]))
    clauses, args = filters.where()
    if cursor is not None:
        cond, cargs = _after(cursor)
        clauses.append(cond)
        args += cargs
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    found: list[tuple[Key, tuple[Any, ...]]] = []
    budget = SCAN_BUDGET
    stop: Cursor | None = None  # where a page cut short by the budget stops
    con = index.connect()
    try:
        i = 0
        while i < len(files):
            (best, worst), first = files[i]
            if len(found) >= want and _prefix(found[want - 1][0]) < _prefix(best):
                break  # no file left can hold a row of the page
            if budget <= 0:
                # Filters the summaries cannot prune (text, metadata) would read on to the
                # oldest day for a rare match: the page ends here, the next one goes on.
                stop = Cursor(None if best[0] else -best[1], "", 0)
                break
            batch = [first]
            i += 1
            # Files whose time ranges overlap the first one's are read with it.
            while (
                i < len(files)
                and len(batch) < _BATCH_FILES
                and _prefix(files[i][0][0]) <= _prefix(worst)
            ):
                batch.append(files[i][1])
                i += 1
            budget -= sum(f.stamp[0] for f in batch)
            found = sorted(found + _read(con, batch, where, args, want), key=lambda r: r[0])[:want]
    finally:
        con.close()
    rows = _skip(found, cursor)
    if stop is not None:
        # Rows at the stop's timestamp may be in files not read yet: they start the next page.
        rows = [r for r in rows if _prefix(r[0]) < _prefix(stop.key)]
        if len(rows) <= size:
            return Page(_with_content(index, rows), True, stop, searched_to=files[i][1].day)
    more = len(rows) > size
    rows = rows[:size]
    return Page(_with_content(index, rows), more, _cursor_after(rows, cursor) if more else None)


def _with_content(
    index: TreeIndex, rows: list[tuple[Key, tuple[Any, ...]]]
) -> list[tuple[Any, ...]]:
    """The rows (without their file) and their records' `messages`, `prompt` and `response`."""
    content: list[tuple[Any, ...] | None] = [None] * len(rows)
    by_file: dict[str, list[int]] = {}
    for n, (_, row) in enumerate(rows):
        by_file.setdefault(row[-1], []).append(n)
    for name, wanted in by_file.items():
        if name.endswith(".jsonl"):
            for n in wanted:
                content[n] = _line_content(Path(name), rows[n][1])
        missing = [n for n in wanted if content[n] is None]
        if missing:  # Parquet, gzip, or a line not found by its id's bytes: DuckDB reads it
            con = index.connect()
            try:
                for n in missing:
                    content[n] = _query_content(con, Path(name), rows[n][1])
            finally:
                con.close()
    return [(*row[:-1], *(content[n] or (None, None, None))) for n, (_, row) in enumerate(rows)]


def _line_content(path: Path, row: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The content of the row's line, found from the end of the file by the id's bytes."""
    request_id, timestamp = row[0], row[1]
    if not isinstance(request_id, str):
        return None
    needle = orjson.dumps(request_id)
    if not needle.isascii() or b"\\" in needle:
        return None  # an encoder may escape it differently: let DuckDB find it
    try:
        with (
            path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm,
        ):
            end = len(mm)
            while (at := mm.rfind(needle, 0, end)) >= 0:
                start = mm.rfind(b"\n", 0, at) + 1
                stop = mm.find(b"\n", at)
                end = start
                try:
                    data = orjson.loads(mm[start : stop if stop >= 0 else len(mm)])
                except orjson.JSONDecodeError:
                    continue
                if (
                    isinstance(data, dict)
                    and data.get("request_id") == request_id
                    and data.get("timestamp") == timestamp
                ):
                    return tuple(data.get(name) for name in _CONTENT)
    except (OSError, ValueError):  # gone, or empty (mmap of 0 bytes)
        return None
    return None


def _query_content(con: Any, path: Path, row: tuple[Any, ...]) -> tuple[Any, ...] | None:
    source = files_sql(con, [path], _FILE)
    same = "request_id IS NULL" if row[0] is None else "request_id = ?"
    try:
        found = con.execute(
            f"SELECT {', '.join(_CONTENT)} FROM ({source}) WHERE {same} "
            "AND timestamp IS NOT DISTINCT FROM ? LIMIT 1",
            [*([] if row[0] is None else [row[0]]), row[1]],
        ).fetchone()
    except duckdb_module().Error as exc:
        raise QueryError(f"cannot read the log tree: {_first_line(exc)}") from None
    if found is None:
        return None
    return tuple(orjson.loads(v) if isinstance(v, str) else v for v in found)


def _read(
    con: Any, batch: Sequence[_File], where: str, args: list[Any], limit: int
) -> list[tuple[Key, tuple[Any, ...]]]:
    source = files_sql(con, [f.path for f in batch], _FILE)
    try:
        rows = con.execute(
            f"SELECT epoch_us(ts), {_ROW_COLUMNS} FROM ({source}) {where} "
            "ORDER BY ts DESC NULLS LAST, request_id LIMIT ?",
            [*args, limit],
        ).fetchall()
    except duckdb_module().Error as exc:  # a file removed since it was listed, say
        raise QueryError(f"cannot read the log tree: {_first_line(exc)}") from None
    return [(_key(r[0], r[1]), tuple(r[1:])) for r in rows]


def _skip(
    found: list[tuple[Key, tuple[Any, ...]]], cursor: Cursor | None
) -> list[tuple[Key, tuple[Any, ...]]]:
    """Drop the rows of the cursor's own key the pages before already showed."""
    if cursor is None or not cursor.seen:
        return found
    out, dropped = [], 0
    for key, row in found:
        if key == cursor.key and dropped < cursor.seen:
            dropped += 1
            continue
        out.append((key, row))
    return out


def _cursor_after(rows: list[tuple[Key, tuple[Any, ...]]], start: Cursor | None) -> Cursor:
    last_key, last = rows[-1]
    seen = sum(1 for key, _ in rows if key == last_key)
    if start is not None and start.key == last_key:
        seen += start.seen
    micros = None if last_key[0] else -last_key[1]
    return Cursor(micros, last[0], seen)
