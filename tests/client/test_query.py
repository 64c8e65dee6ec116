"""`vllm-mw query`: DuckDB over a `logs` view of the whole tree (JSONL, gz and Parquet days)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from vllm_middleware._cli import main
from vllm_middleware._exceptions import QueryError
from vllm_middleware._query import connect, run_query, write_result


def rec(rid: str, day: str = "2025-10-21", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "timestamp": f"{day}T10:00:00.250000+00:00",
        "request_id": rid,
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "response": {"choices": [{"message": {"content": "yo"}, "finish_reason": "stop"}]},
        "latency_ms": 10.0,
        "error": None,
        "metadata": {"app": "app-7", "tier": 2},
        "usage": {"prompt_tokens": 5, "completion_tokens": 6},
        "host": "raw host name",
    }
    base.update(extra)
    return base


def write(root: Path, day: str, host: str, records: list[dict[str, Any]], name: str) -> Path:
    path = root / f"date={day}" / f"host={host}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write(tmp_path, "2025-10-21", "app-7", [rec("a"), rec("b", model="x")], "w-1.jsonl")
    write(tmp_path, "2025-10-21", "007", [rec("c", error="boom", response=None)], "w-1.jsonl")
    # Old and odd shapes: a schema-1 record, a metadata-only record, a field unknown to the view.
    old = {"timestamp": "2025-10-22T01:00:00", "request_id": "d", "model": "m", "latency_ms": 3}
    bare = {"timestamp": "2025-10-22T02:00:00+00:00", "request_id": "e", "model": "m", "new": 1}
    write(tmp_path, "2025-10-22", "app-7", [old, bare], "w-2.jsonl.gz")
    return tmp_path


def rows(root: Path, sql: str) -> list[tuple[Any, ...]]:
    return list(run_query(root, sql).rows())


def test_the_view_reads_every_file_with_date_and_host_from_the_layout(tree: Path) -> None:
    got = rows(tree, "SELECT request_id, CAST(date AS VARCHAR), host FROM logs ORDER BY 1")
    assert got == [
        ("a", "2025-10-21", "app-7"),
        ("b", "2025-10-21", "app-7"),
        ("c", "2025-10-21", "007"),  # a partition value stays text
        ("d", "2025-10-22", "app-7"),
        ("e", "2025-10-22", "app-7"),
    ]


def test_metadata_keys_and_derived_columns_are_reachable(tree: Path) -> None:
    got = rows(
        tree,
        "SELECT request_id, metadata->>'app', CAST(metadata->>'tier' AS INT), input_tokens, "
        "output_tokens, finish_reason, epoch_ms(ts) % 1000 FROM logs "
        "WHERE date = DATE '2025-10-21' ORDER BY 1",
    )
    assert got[0] == ("a", "app-7", 2, 5, 6, "stop", 250)
    assert got[2][5] is None  # the failed call has no finish reason
    assert rows(tree, "SELECT count(*) FROM logs WHERE error IS NOT NULL") == [(1,)]


def test_parquet_days_and_jsonl_days_read_as_one_view(tree: Path) -> None:
    # A compacted day: Parquet with its own column types (nested fields as text, no `usage`).
    target = tree / "date=2025-10-20" / "host=app-7"
    target.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(
        "COPY (SELECT '2025-10-20T09:00:00+00:00' AS timestamp, 'p' AS request_id, 'm' AS model, "
        '\'{"app": "app-9"}\' AS metadata, 7.5 AS latency_ms) '
        f"TO '{target / 'part-0.parquet'}' (FORMAT parquet)"
    )
    con.close()
    got = rows(
        tree,
        "SELECT request_id, CAST(date AS VARCHAR), host, metadata->>'app', latency_ms, usage "
        "FROM logs WHERE request_id IN ('p', 'a') ORDER BY 1",
    )
    assert got == [
        ("a", "2025-10-21", "app-7", "app-7", 10.0, '{"prompt_tokens":5,"completion_tokens":6}'),
        ("p", "2025-10-20", "app-7", "app-9", 7.5, None),
    ]


def test_an_empty_tree_has_an_empty_view(tmp_path: Path) -> None:
    assert rows(tmp_path, "SELECT count(*), count(DISTINCT host) FROM logs") == [(0, 0)]


def test_bad_sql_is_a_one_line_error_not_a_traceback(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(QueryError, match="syntax error"):
        run_query(tree, "SELEC 1")
    with pytest.raises(QueryError, match="no_such_column"):
        run_query(tree, "SELECT no_such_column FROM logs")
    assert main(["query", "--log-dir", str(tree), "SELECT * FROM nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-mw: query: Catalog Error") and err.count("\n") == 1


def test_a_missing_duckdb_names_the_extra(tree: Path) -> None:
    code = (
        "import sys; sys.modules['duckdb'] = None\n"
        "from vllm_middleware._cli import main\n"
        f"sys.exit(main(['query', '--log-dir', {str(tree)!r}, 'SELECT 1']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "vllm-mw: query: querying the logs needs DuckDB: pip install 'vllm-middleware[analytics]'"
    )


def test_table_csv_json_and_jsonl_output(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT request_id, metadata, latency_ms, date FROM logs WHERE date = '2025-10-21'"
    assert main(["query", "--log-dir", str(tree), "--format", "csv", sql + " ORDER BY 1"]) == 0
    parsed = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert parsed[0] == ["request_id", "metadata", "latency_ms", "date"]
    assert parsed[1] == ["a", '{"app":"app-7","tier":2}', "10.0", "2025-10-21"]
    assert main(["query", "--log-dir", str(tree), "--json", sql + " ORDER BY 1"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert items[0] == {
        "request_id": "a",
        "metadata": {"app": "app-7", "tier": 2},  # JSON columns come back as JSON
        "latency_ms": 10.0,
        "date": "2025-10-21",
    }
    assert main(["query", "--log-dir", str(tree), "--format", "jsonl", sql]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    out = io.StringIO()
    write_result(run_query(tree, sql + " ORDER BY 1"), out, "table", max_rows=2)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["request_id", "metadata", "latency_ms", "date"]
    assert lines[2].startswith("a ") and len(lines) == 5
    assert lines[-1] == "(2 rows; more not shown, use --format csv or json)"


def test_connect_gives_the_view_to_other_tools(tree: Path) -> None:
    con = connect(tree)
    try:
        assert con.execute("SELECT count(*) FROM logs WHERE host = 'app-7'").fetchone() == (4,)
    finally:
        con.close()


def test_a_compacted_tree_reads_as_it_did_before(tmp_path: Path) -> None:
    """`vllm-mw compact` turns closed days into Parquet; the view gives the same rows."""
    from vllm_middleware._compact import compact_tree

    from .test_report import make_tree

    root = tmp_path / "logs"
    make_tree(root, n=300)
    write(root, "2025-10-21", "h0", [rec("odd", metadata=None, usage=None)], "w-9.jsonl")

    def snapshot() -> list[tuple[Any, ...]]:
        result = run_query(root, "SELECT * FROM logs ORDER BY request_id")
        json_columns = result.json_columns
        return [
            tuple(
                orjson.loads(v) if i in json_columns and v is not None else v
                for i, v in enumerate(row)
            )
            for row in result.rows()
        ]

    before = snapshot()
    compacted = compact_tree(root, min_age_s=0)
    assert compacted.records == 301
    assert list(root.rglob("*.jsonl")) == [] and list(root.rglob("*.parquet"))
    after = snapshot()
    assert len(after) == len(before) == 301
    for old, new in zip(before, after, strict=True):
        assert old == new
    # A late record for a compacted day: JSONL beside the Parquet file, both read.
    write(root, "2025-10-20", "h0", [rec("late", "2025-10-20")], "w-late.jsonl")
    assert rows(root, "SELECT count(*) FROM logs WHERE date = DATE '2025-10-20'") == [(101,)]
