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
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from vllm_middleware import VLLMMiddleware
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
    first, third = client.get("/").text, client.get("/", params={"page": 3}).text
    assert first.count("<tr") == 51 and 'rel="next"' in first and "r119" in first
    assert third.count("<tr") == 21 and 'rel="next"' not in third and "r000" in third


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
