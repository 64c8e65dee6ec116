"""`vllm-mw ui`: the local viewer, over HTTP and in a real headless Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

import pytest
from starlette.testclient import TestClient
from vllm_middleware import VLLMMiddleware, _ui_pages
from vllm_middleware._cli import main
from vllm_middleware._exceptions import ConfigurationError
from vllm_middleware._ui import check_listen, create_app
from vllm_middleware_testing import FakeVLLMServer

from ..conftest import wait_for
from .test_export import MODEL, WEATHER

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def png(width: int = 48, height: int = 48) -> bytes:
    """A real PNG (a colour pattern with noise, so it stays over the 1 KiB media threshold)."""
    rows = b""
    for y in range(height):
        row = bytes(
            v
            for x in range(width)
            for v in ((x * 5) % 256, (y * 5) % 256, ((x * y) * 7 + x * 13) % 256)
        )
        rows += b"\x00" + row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


async def traffic(base_url: str, log_dir: Path) -> None:
    import base64

    image = base64.b64encode(png()).decode()
    assert len(image) > 1024
    async with VLLMMiddleware(
        base_url=base_url, log_dir=log_dir, host="app-7", metadata={"team": "search"}
    ) as client:
        for i in range(3):
            await client.chat_completion([{"role": "user", "content": f"hello {i}"}], model=MODEL)
        asked = [{"role": "user", "content": "Weather in Paris?"}]
        await client.chat_completion(asked, model=MODEL, tools=[WEATHER])
        picture = [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ]
        await client.chat_completion([{"role": "user", "content": picture}], model=MODEL)
        await client.chat_completion(
            [{"role": "user", "content": "<script>alert(1)</script>"}], model=MODEL
        )
        with pytest.raises(Exception):  # noqa: B017 - the failure is logged as a record
            await client.chat_completion([{"role": "user", "content": "x"}], model="no-such")


@pytest.fixture
def logs(fake_vllm: FakeVLLMServer, tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    asyncio.run(traffic(fake_vllm.base_url, root))
    return root


def test_listen_is_loopback_unless_allowed(tmp_path: Path) -> None:
    assert check_listen("127.0.0.1:8089", False) == ("127.0.0.1", 8089)
    assert check_listen("[::1]:80", False) == ("::1", 80)
    assert check_listen("localhost:80", False) == ("localhost", 80)
    for public in ("0.0.0.0:8089", "192.168.1.4:80", "example.com:80"):
        with pytest.raises(ConfigurationError, match="--allow-remote"):
            check_listen(public, False)
    assert check_listen("0.0.0.0:8089", True) == ("0.0.0.0", 8089)
    with pytest.raises(ConfigurationError):
        check_listen("8089", False)
    assert main(["ui", "--log-dir", str(tmp_path), "--listen", "0.0.0.0:8089"]) == 2


def test_list_filters_and_pages(logs: Path) -> None:
    client = TestClient(create_app(logs))
    page = client.get("/")
    assert page.status_code == 200
    assert page.text.count("<tr") == 1 + 7  # header + every request
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    errors = client.get("/", params={"status": "error"}).text
    assert errors.count("<tr") == 2 and "no-such" in errors
    assert client.get("/", params={"model": "no-such"}).text.count("<tr") == 2
    assert client.get("/", params={"q": "paris"}).text.count("<tr") == 2
    assert client.get("/", params={"meta": "team=search"}).text.count("<tr") == 8
    assert client.get("/", params={"meta": "team=other"}).text.count("<tr") == 2  # "none" row
    assert client.get("/", params={"q": "100%"}).text.count("<tr") == 2  # % is literal
    # Escaped everywhere: a prompt is text, never markup.
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert client.post("/").status_code == 405  # read-only


def test_pages_of_fifty(tmp_path: Path) -> None:
    import orjson

    part = tmp_path / "date=2025-10-21" / "host=a" / "w.jsonl"
    part.parent.mkdir(parents=True)
    lines = [
        {"timestamp": f"2025-10-21T10:{i // 60:02d}:{i % 60:02d}+00:00", "request_id": f"r{i:03d}"}
        for i in range(120)
    ]
    part.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    client = TestClient(create_app(tmp_path))
    first = client.get("/").text
    second = client.get(_next_link(first)).text
    third = client.get(_next_link(second)).text
    assert first.count("<tr") == 51 and 'rel="next"' in first and "r119" in first
    assert third.count("<tr") == 21 and 'rel="next"' not in third and "r000" in third
    assert "page 3" in third and 'rel="first"' in third


def _next_link(text: str) -> str:
    found = re.search(r'<a rel="next" href="([^"]+)"', text)
    assert found is not None
    return found.group(1).replace("&amp;", "&")


def _ids(text: str) -> list[str]:
    return [unquote(m) for m in re.findall(r'<td><a href="/request/([^"?]*)\?', text)]


def _walk(client: TestClient, params: dict[str, str], between: Any = None) -> list[str]:
    """The request ids of every page, following the "older" links (`between` runs after each)."""
    text = client.get("/?" + urlencode(params)).text
    ids = _ids(text)
    while 'rel="next"' in text:
        if between is not None:
            between()
        text = client.get(_next_link(text)).text
        assert len(_ids(text)) <= 50
        ids += _ids(text)
    return ids


def _plain(root: Path, where: str = "", args: Sequence[Any] = ()) -> list[str]:
    """The same rows by a plain query over the whole tree."""
    from vllm_middleware._query import connect

    con = connect(root)
    try:
        rows = con.execute(
            f"SELECT request_id FROM logs {where} ORDER BY ts DESC NULLS LAST, request_id",
            list(args),
        ).fetchall()
    finally:
        con.close()
    return ["" if r[0] is None else r[0] for r in rows]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    import orjson

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as out:
        out.write(b"".join(orjson.dumps(r) + b"\n" for r in records))


def _record(i: int, day: str, **extra: Any) -> dict[str, Any]:
    failed = i % 9 == 4
    return {
        "timestamp": f"{day}T{(i * 7) % 24:02d}:{i % 60:02d}:{(i * 13) % 60:02d}.{i:06d}+00:00",
        "request_id": f"req_{day.replace('-', '')}_{i:05d}",
        "model": ("m-a", "m-b", "m-c")[i % 3],
        "messages": [
            {"role": "user", "content": f"question {i} {'needle' if i % 11 == 0 else ''}"}
        ],
        "response": None if failed else {"choices": [{"message": {"content": f"answer {i}"}}]},
        "error": "HTTP 500" if failed else None,
        "status_code": 500 if failed else 200,
        "metadata": {"team": ("red", "blue")[i % 2]},
        **extra,
    }


def _mixed_tree(root: Path) -> None:
    """Three days, two hosts, several files per partition; one day compacted to Parquet;
    rows without a timestamp, rows sharing a timestamp, a duplicated record, a torn line."""
    from vllm_middleware._compact import compact_tree

    i = 0
    for day in ("2025-10-19", "2025-10-20", "2025-10-21"):
        for host in ("app-1", "app-2"):
            for name in ("w1.jsonl", "w2.jsonl"):
                batch = [_record(i + k, day) for k in range(45)]
                i += 45
                _write(root / f"date={day}" / f"host={host}" / name, batch)
    old = 1_000_000_000.0
    for path in (root / "date=2025-10-19").rglob("*"):
        os.utime(path, (old, old))
    assert compact_tree(root, day="2025-10-19", min_age_s=0).errors == []
    assert any((root / "date=2025-10-19").rglob("*.parquet"))
    live = root / "date=2025-10-21" / "host=app-1" / "w3.jsonl"
    same = "2025-10-21T05:00:00+00:00"
    _write(live, [_record(9000 + k, "2025-10-21", timestamp=same) for k in range(60)])
    _write(live, [_record(9100 + k, "2025-10-21", timestamp=None) for k in range(55)])
    _write(live, [_record(9200, "2025-10-21"), _record(9200, "2025-10-21")])  # twice
    with live.open("ab") as out:
        out.write(b'{"timestamp": "2025-10-21T01:00:00+00:00", "request_id": "torn')


FILTERS: list[tuple[dict[str, str], str, list[Any]]] = [
    ({}, "", []),
    ({"model": "m-b"}, "WHERE model = ?", ["m-b"]),
    ({"host": "app-2"}, "WHERE host = ?", ["app-2"]),
    ({"status": "error"}, "WHERE error IS NOT NULL", []),
    ({"status": "ok", "model": "m-a"}, "WHERE error IS NULL AND model = ?", ["m-a"]),
    ({"meta": "team=red"}, "WHERE metadata->>'team' = ?", ["red"]),
    ({"q": "NEEDLE"}, "WHERE CAST(messages AS VARCHAR) ILIKE ?", ["%needle%"]),
    ({"since": "2025-10-20"}, "WHERE date >= ?", ["2025-10-20"]),
    (
        {"until": "2025-10-20", "host": "app-1"},
        "WHERE date <= ? AND host = ?",
        ["2025-10-20", "app-1"],
    ),
]


@pytest.mark.parametrize("budget", [_ui_pages.SCAN_BUDGET, 1], ids=["whole", "cut-short"])
@pytest.mark.parametrize(("params", "where", "args"), FILTERS, ids=lambda v: str(v))
def test_pages_show_the_plain_query_rows(
    tmp_path: Path,
    params: dict[str, str],
    where: str,
    args: list[Any],
    budget: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Page after page, the rows of the plain query over the whole tree, in its order; also
    when each page may read one batch of files only (pages cut short, some of them empty)."""
    monkeypatch.setattr(_ui_pages, "SCAN_BUDGET", budget)
    _mixed_tree(tmp_path)
    expected = _plain(tmp_path, where, args)
    assert len(expected) > 50 or params.get("q")  # more than one page, most of them
    assert _walk(TestClient(create_app(tmp_path)), params) == expected


def test_pages_hold_while_records_arrive(tmp_path: Path) -> None:
    _mixed_tree(tmp_path)
    client = TestClient(create_app(tmp_path))
    live = tmp_path / "date=2025-10-21" / "host=app-2" / "w1.jsonl"
    arrivals = iter(range(100))

    def arrive() -> None:
        k = next(arrivals)
        if k >= 5:  # the last pages hold the rows without a timestamp: nothing sorts after them
            return
        # Newer than every page already shown (never on the pages that follow), a new day,
        # and one older than anything (a late host): it must show up on the last page.
        _write(live, [_record(20000 + k, "2025-10-21", timestamp="2025-10-21T23:59:59+00:00")])
        _write(
            tmp_path / "date=2025-10-22" / "host=app-3" / "w.jsonl",
            [_record(30000 + k, "2025-10-22")],
        )
        late = tmp_path / "date=2025-10-18" / "host=app-1" / "w.jsonl"
        stamp = f"2025-10-18T10:{59 - k:02d}:00+00:00"  # older at each page
        _write(late, [_record(40000 + k, "2025-10-18", timestamp=stamp)])

    shown = _walk(client, {}, between=arrive)
    arrived = {f"req_20251021_{20000 + k:05d}" for k in range(5)}
    arrived |= {f"req_20251022_{30000 + k:05d}" for k in range(5)}
    assert {f"req_20251018_{40000 + k:05d}" for k in range(5)} <= set(shown)
    assert shown == [rid for rid in _plain(tmp_path) if rid not in arrived]


def test_a_growing_file_is_read_again(tmp_path: Path) -> None:
    live = tmp_path / "date=2025-10-21" / "host=app-1" / "w.jsonl"
    _write(live, [_record(k, "2025-10-21") for k in range(10)])
    client = TestClient(create_app(tmp_path))
    assert "m-new" not in client.get("/").text
    _write(live, [_record(99, "2025-10-21", model="m-new", timestamp="2025-10-21T23:00:00+00:00")])
    page = client.get("/").text
    assert '<option value="m-new">m-new</option>' in page
    assert _ids(page)[0] == "req_20251021_00099"
    assert _walk(client, {"model": "m-new"}) == ["req_20251021_00099"]
    live.unlink()
    assert "m-new" not in client.get("/").text
    assert client.get("/", params={"since": "nope"}).status_code == 400


def test_a_request_page_renders_the_conversation(logs: Path) -> None:
    client = TestClient(create_app(logs))
    links = re.findall(r'href="(/request/[^"]+)"', client.get("/", params={"q": "picture"}).text)
    page = client.get(links[0].replace("&amp;", "&")).text
    assert '<img class="media" alt="image" src="data:image/png;base64,' in page  # restored
    assert "What is in this picture?" in page
    tools = re.findall(r'href="(/request/[^"]+)"', client.get("/", params={"q": "paris"}).text)
    tool_page = client.get(tools[0].replace("&amp;", "&")).text
    assert '<span class="tool-name">get_weather</span>' in tool_page
    assert "raw record" in tool_page and "parameters" in tool_page
    # A bare link (no partition given) finds the record too; an unknown id is a 404.
    rid = links[0].split("/request/")[1].split("?")[0]
    assert client.get(f"/request/{rid}").status_code == 200
    assert client.get("/request/nope").status_code == 404
    assert client.get("/report").status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(logs: Path) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_middleware._cli",
            "ui",
            "--log-dir",
            str(logs),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def up() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(up, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_viewer_in_headless_chromium(server: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium: apt-get install chromium (scripts/test.sh does it when root)")
    problems: list[str] = []
    outside: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on(
                "request",
                lambda r: outside.append(r.url) if not r.url.startswith(server) else None,
            )
            page.goto(server + "/")
            rows = page.locator("table.requests tbody tr")
            assert rows.count() == 7
            page.screenshot(path=str(ARTIFACTS / "ui-list.png"), full_page=True)
            # Filter: errors only.
            page.select_option("select[name=status]", "error")
            page.click("button[type=submit]")
            page.wait_for_url("**status=error**")
            assert rows.count() == 1 and "no-such" in rows.first.inner_text()
            # Free text, then open the request and see its image.
            page.goto(server + "/")
            page.fill("input[name=q]", "picture")
            page.click("button[type=submit]")
            page.wait_for_url("**q=picture**")
            page.click("table.requests tbody tr >> nth=0 >> a")
            image = page.locator("img.media")
            image.wait_for()
            assert page.evaluate("document.querySelector('img.media').naturalWidth") == 48
            page.screenshot(path=str(ARTIFACTS / "ui-request-image.png"), full_page=True)
            # A tool call.
            page.goto(server + "/?q=Paris")
            page.click("table.requests tbody tr >> nth=0 >> a")
            assert page.locator(".tool-call .tool-name").inner_text() == "get_weather"
            page.screenshot(path=str(ARTIFACTS / "ui-request-tool.png"), full_page=True)
            page.goto(server + "/report")
            assert page.locator("svg.chart").count() == 4
        finally:
            browser.close()
    assert problems == []
    assert outside == []


def test_a_request_page_from_its_partition_or_a_bare_link(tmp_path: Path) -> None:
    _mixed_tree(tmp_path)
    client = TestClient(create_app(tmp_path))
    # A record whose id does not name its day, and one whose id names another day.
    _write(
        tmp_path / "date=2025-10-20" / "host=app-9" / "w.jsonl",
        [
            _record(1, "2025-10-20", request_id="custom/1 ?x"),
            _record(2, "2025-10-20", request_id="req_20251021_99999"),
        ],
    )
    link = next(
        m
        for m in re.findall(r'href="(/request/[^"]+)"', client.get("/?host=app-9").text)
        if "custom" in m
    )
    assert "custom/1 ?x" in client.get(link.replace("&amp;", "&")).text
    assert client.get("/request/custom%2F1%20%3Fx").status_code == 200
    assert client.get("/request/req_20251021_99999").status_code == 200
    compacted = _ids(client.get("/?until=2025-10-19").text)[0]  # from a Parquet day
    assert client.get(f"/request/{compacted}").status_code == 200
    wrong = client.get("/request/custom%2F1%20%3Fx", params={"date": "2025-10-21", "host": "app-9"})
    assert wrong.status_code == 404


def test_rows_show_their_own_prompt_and_answer(tmp_path: Path) -> None:
    """The text of each row is its record's (JSONL read by offset, Parquet through DuckDB)."""
    _mixed_tree(tmp_path)
    client = TestClient(create_app(tmp_path))
    cells = re.compile(
        r'<a href="/request/req_\d+_(\d+)\?[^"]*">.*?<td class="text">([^<]*)</td>'
        r'<td class="text">([^<]*)</td></tr>'
    )
    for params in ({}, {"until": "2025-10-19"}, {"status": "error"}):
        rows = cells.findall(client.get("/", params=params).text)
        assert len(rows) == 50
        for number, prompt, answer in rows:
            i = int(number)
            assert prompt.startswith(f"question {i}")
            assert answer == ("HTTP 500" if i % 9 == 4 else f"answer {i}")
