"""`vllm-mw report`: exact percentiles (checked with numpy), a self-contained HTML file that a real
headless Chromium opens without errors, every chart present."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from vllm_middleware._cli import main
from vllm_middleware._report import ReportOptions, build_report, figures

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
SCREENSHOTS = Path(__file__).parents[2] / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DAYS = ("2025-10-20", "2025-10-21", "2025-10-22")
MODELS = ("llama-8b", "qwen-7b")


def make_tree(root: Path, n: int = 600, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        day = DAYS[i % 3]
        model = MODELS[i % 2]
        stream = i % 4 == 0
        failed = i % 17 == 0
        record: dict[str, Any] = {
            "timestamp": f"{day}T{i % 24:02d}:00:00.{i:06d}+00:00",
            "request_id": f"req_{i}",
            "model": model,
            "messages": [{"role": "user", "content": f"q{i}"}],
            "response": None if failed else {"choices": [{"finish_reason": "stop"}]},
            "latency_ms": round(rng.lognormvariate(4, 0.8), 3),
            "error": "HTTP 500: boom" if failed else None,
            "status_code": 500 if failed else 200,
            "metadata": {"app": f"app-{i % 5}"},
            "usage": None
            if failed
            else {"prompt_tokens": 10 + i % 50, "completion_tokens": i % 90},
            "stream": stream,
            "ttft_ms": round(rng.uniform(5, 80), 3) if stream else None,
            "host": f"h{i % 2}",
        }
        if stream:
            record["stream_end"] = "cancelled" if i % 8 == 0 else "completed"
        records.append(record)
        path = root / f"date={day}" / f"host=h{i % 2}" / "w-1.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as handle:
            handle.write(orjson.dumps(record) + b"\n")
    return records


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path / "logs"
    return root, make_tree(root)


def pcts(values: list[float]) -> list[float]:
    # numpy's default method ("linear") is DuckDB's quantile_cont.
    return [float(np.percentile(values, q)) for q in (50, 90, 99)]


def test_percentiles_are_exact(tree: tuple[Path, list[dict[str, Any]]]) -> None:
    root, records = tree
    figs = figures(root, ReportOptions(by="model"))
    latencies = [r["latency_ms"] for r in records]
    assert figs["latency"] == pytest.approx(pcts(latencies), rel=1e-12)
    ttfts = [r["ttft_ms"] for r in records if r["ttft_ms"] is not None]
    assert figs["ttft"] == pytest.approx(pcts(ttfts), rel=1e-12)
    for row in figs["by_dim"]:
        mine = [r for r in records if r["model"] == row[0]]
        assert row[1] == len(mine)
        assert row[2] == sum(1 for r in mine if r["error"])
        assert list(row[5:8]) == pytest.approx(pcts([r["latency_ms"] for r in mine]), rel=1e-12)
    for row in figs["over_time"]:  # per day
        mine = [r["latency_ms"] for r in records if r["timestamp"].startswith(row[0])]
        assert list(row[3:6]) == pytest.approx(pcts(mine), rel=1e-12)


def test_totals_filters_dimensions_and_costs(tree: tuple[Path, list[dict[str, Any]]]) -> None:
    root, records = tree
    figs = figures(root, ReportOptions(since="2025-10-21", until="20251021", by="meta.app"))
    day = [r for r in records if r["timestamp"].startswith("2025-10-21")]
    total, errors, tin, _tout, first, last = figs["totals"]
    assert (total, errors) == (len(day), sum(1 for r in day if r["error"]))
    assert tin == sum(r["usage"]["prompt_tokens"] for r in day if r["usage"])
    assert str(first) == str(last) == "2025-10-21"
    assert figs["hourly"] and {row[0] for row in figs["by_dim"]} == {f"app-{k}" for k in range(5)}
    ends = dict(figs["streams"])
    assert ends == {
        end: sum(1 for r in day if r.get("stream_end") == end) for end in ("completed", "cancelled")
    }
    slowest = figs["slowest"]
    assert slowest[0][4] == max(r["latency_ms"] for r in day)
    assert len(figs["failing"]) == min(20, errors)
    prices = ReportOptions(by="model", prices={"llama-8b": (0.5, 1.5)})
    document = build_report(root, prices)
    llama = [r for r in records if r["model"] == "llama-8b" and r["usage"]]
    cost = sum(
        r["usage"]["prompt_tokens"] * 0.5 + r["usage"]["completion_tokens"] * 1.5 for r in llama
    )
    assert f"{cost / 1_000_000:,.4f}" in document
    assert "no price for: qwen-7b" in document


def test_the_report_is_one_self_contained_file(
    tree: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    root, _ = tree
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."llama-8b"]\ninput = 0.5\noutput = 1.5\n')
    out = tmp_path / "report.html"
    argv = ["report", "--log-dir", str(root), "--by", "host", "--prices", str(prices)]
    assert main([*argv, "--out", str(out)]) == 0
    document = out.read_text()
    # No script, no reference to anything outside the file.
    assert "<script" not in document
    assert not re.search(r"(src|href)\s*=", document)
    assert "http://" not in document.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in document
    assert document.count('<svg class="chart"') == 4
    assert main(["report", "--log-dir", str(root), "--by", "nope", "--out", str(out)]) == 2


def test_bad_prices_and_dates_are_one_line_errors(
    tree: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = tree
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."x"]\ninput = "cheap"\n')
    out = str(tmp_path / "r.html")
    assert main(["report", "--log-dir", str(root), "--prices", str(prices), "--out", out]) == 2
    assert main(["report", "--log-dir", str(root), "--since", "2025-13-01", "--out", out]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("vllm-mw: ") for line in err)


def _browser() -> Any:
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium: apt-get install chromium (scripts/test.sh does it when root)")
    return playwright


def test_the_report_opens_in_headless_chromium(
    tree: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    sync_api = _browser()
    root, _ = tree
    out = tmp_path / "report.html"
    out.write_text(build_report(root, ReportOptions(by="model", prices={"llama-8b": (0.5, 1.5)})))
    problems: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1150, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            charts = page.locator("svg.chart")
            assert charts.count() == 4  # 3 over time, 1 by model
            for i in range(charts.count()):
                box = charts.nth(i).bounding_box()
                assert box is not None and box["width"] > 300 and box["height"] > 50
            assert page.locator("polyline").count() == 8
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert requests == [out.as_uri()]  # nothing fetched besides the file itself
