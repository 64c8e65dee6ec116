"""`vllm-mw`: stats and the demo, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vllm_middleware import load_logs
from vllm_middleware_testing import RedisServerProcess


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
    import redis as sync_redis

    with sync_redis.Redis.from_url(redis_server.url) as raw:
        raw.xgroup_create("vllm:logs", "workers", id="0", mkstream=True)
        raw.hset("vllm:logs:stats", mapping={"scanned_at": "1764500000.250"})
    empty = vllm_mw("stats", "--json", "--redis-url", redis_server.url, cwd=tmp_path)
    assert empty.returncode == 0, empty.stderr
    stats = json.loads(empty.stdout)
    assert stats["total_requests"] == 0 and stats["mode"] == "redis"
    assert stats["source"] == f"redis {redis_server.url} stream vllm:logs"
    assert stats["files_scanned_at"] == "2025-11-30T10:53:20.250+00:00"
    text = vllm_mw("stats", "--log-dir", str(tmp_path), cwd=tmp_path)
    assert text.returncode == 0 and "log_files_count" in text.stdout
    first = text.stdout.splitlines()[0].split()
    assert first == ["source", "files", "under", str(tmp_path.resolve())], text.stdout


def one_line_failure(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The command failed with exactly one line on stderr (no traceback) holding `expected`."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vllm-mw: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_stats_with_redis_unreachable_is_one_line_with_the_password_masked(
    tmp_path: Path,
) -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
    result = vllm_mw("stats", cwd=tmp_path, env={"VLLM_MW_REDIS_URL": url})
    line = one_line_failure(
        result, "vllm-mw: stats: cannot read Redis at redis://:***@127.0.0.1:1/0"
    )
    assert "hunter2" not in line
    verbose = vllm_mw("stats", "-v", cwd=tmp_path, env={"VLLM_MW_REDIS_URL": url})
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--redis-url", "localhost:6379"], "redis_url='localhost:6379' is invalid"),
        (["--redis-url", "http://x"], "must start with one of redis://"),
        (["--log-dir", "{tmp}/nope"], "log directory {tmp}/nope does not exist"),
        (["--log-dir", "{tmp}/a-file"], "{tmp}/a-file is not a directory"),
        ([], "log directory ./logs/vllm does not exist (the default: give --log-dir"),
        (["--stream", "x"], "--stream needs a Redis URL"),
        (["--log-dir", "{tmp}", "--redis-url", "redis://127.0.0.1:1/0"], "give one source"),
    ],
)
def test_stats_refuses_what_it_cannot_read(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    args = [a.format(tmp=tmp_path) for a in args]
    result = vllm_mw("stats", *args, cwd=tmp_path)
    one_line_failure(result, "vllm-mw: stats: ", expected.format(tmp=tmp_path))


def test_stats_refuses_log_dir_with_a_redis_url_from_the_environment(tmp_path: Path) -> None:
    env = {"VLLM_MW_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = vllm_mw("stats", "--log-dir", str(tmp_path), cwd=tmp_path, env=env)
    one_line_failure(result, "--log-dir scans files but VLLM_MW_REDIS_URL names a Redis")


def test_stats_refuses_a_stream_that_does_not_exist(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    result = vllm_mw(
        "stats", "--redis-url", redis_server.url, "--stream", "wrongname", cwd=tmp_path
    )
    one_line_failure(result, "no stream 'wrongname' at ")


def test_redis_password_from_a_file_not_argv(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServerProcess(tmp_dir=tmp_path / "redis", password="s3cret/:x").start()
    try:
        with sync_redis_client(server.url) as raw:
            raw.xgroup_create("vllm:logs", "workers", id="0", mkstream=True)
        bare = server.url.replace(":s3cret%2F%3Ax@", "")
        secret = tmp_path / "redis-password"
        secret.write_text("s3cret/:x\n")
        env = {"VLLM_MW_REDIS_PASSWORD_FILE": str(secret)}
        ok = vllm_mw("stats", "--json", "--redis-url", bare, cwd=tmp_path, env=env)
        assert ok.returncode == 0, ok.stderr
        assert ok.stderr == "" and json.loads(ok.stdout)["mode"] == "redis"
        denied = vllm_mw("stats", "--redis-url", bare, cwd=tmp_path)
        one_line_failure(denied, "cannot read Redis at")
        in_argv = vllm_mw("stats", "--json", "--redis-url", server.url, cwd=tmp_path)
        assert in_argv.returncode == 0
        assert "visible to every user" in in_argv.stderr and "s3cret" not in in_argv.stderr
        missing = vllm_mw(
            "stats", cwd=tmp_path, env={"VLLM_MW_REDIS_PASSWORD_FILE": str(tmp_path / "none")}
        )
        one_line_failure(missing, "VLLM_MW_REDIS_PASSWORD_FILE=", "cannot read it")
    finally:
        server.stop()


def sync_redis_client(url: str) -> Any:
    import redis as sync_redis

    return sync_redis.Redis.from_url(url)


def test_version(tmp_path: Path) -> None:
    from vllm_middleware import __version__

    result = vllm_mw("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"vllm-mw {__version__}"


def test_worker_refuses_a_bad_flag_in_one_line(tmp_path: Path) -> None:
    bad = vllm_mw("worker", "--batch-size", "0", cwd=tmp_path)
    one_line_failure(bad, "vllm-mw: worker: batch_size=0 is invalid")
