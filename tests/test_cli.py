"""`vllm-mw`: stats and the demo, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_middleware import load_logs
from vllm_middleware.testing import RedisServerProcess


def vllm_mw(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize("mode", ["embedded", "redis"])
def test_demo_runs_the_pipeline_and_shows_it(tmp_path: Path, mode: str) -> None:
    args = ["demo", "--requests", "60", "--log-dir", str(tmp_path / "logs")]
    if mode == "embedded":
        args.append("--embedded")
    result = vllm_mw(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "FAKE vLLM server" in out and "--base-url" in out
    if mode == "redis":
        assert "private redis-server" in out and "Started 2 worker processes" in out
    assert "== load_logs: 60 records, 6 errors ==" in out
    records = load_logs(tmp_path / "logs")
    assert len(records) == 60 and {r.host for r in records} == {"demo-app-1", "demo-app-2"}


def test_stats_command(tmp_path: Path, redis_server: RedisServerProcess) -> None:
    empty = vllm_mw("stats", "--json", "--redis-url", redis_server.url, cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    stats = json.loads(empty.stdout)
    assert stats["total_requests"] == 0 and stats["mode"] == "redis"
    text = vllm_mw("stats", "--log-dir", str(tmp_path), cwd=tmp_path)
    assert text.returncode == 0 and "log_files_count" in text.stdout
    missing = vllm_mw("stats", "--log-dir", str(tmp_path / "nope"), cwd=tmp_path)
    assert (
        missing.returncode == 0
        and json.loads(
            vllm_mw("stats", "--json", "--log-dir", str(tmp_path / "nope"), cwd=tmp_path).stdout
        )["log_files_count"]
        == 0
    )
