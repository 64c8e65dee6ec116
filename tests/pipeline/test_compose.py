"""docker-compose.yml and deploy/: Docker cannot run here, so the file is parsed and checked, and
its health checks and Redis configuration are run against real redis-server processes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_sync
import yaml
from vllm_middleware.storage import StreamKeys
from vllm_middleware_testing import RedisServerProcess

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PASSWORD = "0123abcd" * 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` escapes."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env and env[name] != "":
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    text = re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, text.replace("$$", "\x00"))
    return text.replace("\x00", "$")


def shell_test(service: str) -> str:
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    return interpolate(test[1], {})


def test_images_are_pinned() -> None:
    for name, service in SERVICES.items():
        image = service.get("image")
        assert image, f"{name} has no image tag"
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else None
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"


def test_the_worker_image_base_is_pinned_to_a_patch_release() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert bases, "no FROM line"
    for base in bases:
        tag = base.split("@")[0].rsplit(":", 1)[-1]
        # `3.11-slim` moves with every patch release; `3.11.11-slim-bookworm` does not.
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{base} is not pinned to a patch release"


def test_compose_requires_the_password_and_keeps_it_out_of_redis_conf() -> None:
    redis_env = SERVICES["redis"]["environment"]
    with pytest.raises(KeyError):
        interpolate(redis_env["REDIS_PASSWORD"], {})
    assert interpolate(redis_env["REDIS_PASSWORD"], {"VLLM_MW_REDIS_PASSWORD": "x"}) == "x"
    url = interpolate(
        SERVICES["worker"]["environment"]["VLLM_MW_REDIS_URL"], {"VLLM_MW_REDIS_PASSWORD": "pw"}
    )
    assert url == "redis://:pw@redis:6379/0"  # fmt: skip
    conf = (ROOT / "deploy" / "redis.conf").read_text()
    active = [line.split() for line in conf.splitlines() if line and not line.startswith("#")]
    assert "requirepass" not in {words[0] for words in active}
    command = interpolate(" ".join(SERVICES["redis"]["command"]), {})
    assert "--include /tmp/requirepass.conf" in command and "$REDIS_PASSWORD" in command
    assert SERVICES["redis"]["ports"] == ["127.0.0.1:6379:6379"]


def test_redis_conf_bounds_memory_and_keeps_aof_on_a_volume(tmp_path: Path) -> None:
    """Start the real redis-server with deploy/redis.conf and the compose password include."""
    assert "redis-data:/data" in SERVICES["redis"]["volumes"]
    assert "redis-data" in COMPOSE["volumes"]
    include = tmp_path / "requirepass.conf"
    include.write_text(f'requirepass "{PASSWORD}"\n')
    port = free_port()
    # deploy/redis.conf as compose runs it; only where it lives and listens is the test's
    # (redis-server enters `dir` while reading the file, and /data exists only in the image).
    conf = tmp_path / "redis.conf"
    text = (ROOT / "deploy" / "redis.conf").read_text()
    assert "\ndir /data\n" in text
    conf.write_text(text.replace("\ndir /data\n", f"\ndir {tmp_path}\n"))
    args = ["--include", str(include), "--port", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(
        ["redis-server", str(conf), *args],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis_sync.Redis(port=port, password=PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            try:
                config = client.config_get("*")
                break
            except redis_sync.ConnectionError:
                assert server.poll() is None, "redis-server refused deploy/redis.conf"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert int(config["maxmemory"]) == 1024**3
        assert config["maxmemory-policy"] == "noeviction"
        assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
        client.close()
        with pytest.raises(redis_sync.AuthenticationError):
            redis_sync.Redis(port=port).ping()
        run_health_check(port, PASSWORD, expect_ok=True)
        run_health_check(port, "wrong", expect_ok=False)
        run_health_check(port, "", expect_ok=False)  # NOAUTH
    finally:
        server.terminate()
        server.wait(timeout=10)


def run_health_check(port: int, password: str, *, expect_ok: bool) -> None:
    shim = Path(tempfile.mkdtemp(prefix="redis-cli-shim-"))
    real = shutil.which("redis-cli")
    assert real, "redis-cli is needed (it ships with redis-server)"
    (shim / "redis-cli").write_text(f'#!/bin/sh\nexec {real} -p {port} "$@"\n')
    (shim / "redis-cli").chmod(0o755)
    env = {"PATH": f"{shim}:/usr/bin:/bin", "REDIS_PASSWORD": password}
    try:
        result = subprocess.run(["sh", "-c", shell_test("redis")], env=env, timeout=20)
    finally:
        shutil.rmtree(shim)
    assert (result.returncode == 0) is expect_ok


def test_worker_health_check_runs_vllm_mw_health(tmp_path: Path) -> None:
    """The worker's check fails when this container's worker is dead, passes when it is
    alive even if the fleet is degraded."""
    worker = SERVICES["worker"]
    assert "vllm-mw health" in shell_test("worker")
    (tmp_path / "r").mkdir()
    with RedisServerProcess(tmp_dir=tmp_path / "r") as server:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "vllm-mw").write_text(
            f'#!/bin/sh\nexec {sys.executable} -m vllm_middleware._cli "$@"\n'
        )
        (bin_dir / "vllm-mw").chmod(0o755)
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOSTNAME": "container-1",
            "VLLM_MW_REDIS_URL": server.url,
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        check = ["sh", "-c", shell_test("worker")]
        assert subprocess.run(check, env=env, timeout=60).returncode != 0
        client = redis_sync.Redis.from_url(server.url)
        beat = {"consumer": "c1", "host": "container-1", "state": "ok"}
        client.set(StreamKeys().heartbeat("c1"), orjson.dumps(beat), px=60_000)
        client.close()
        # Degraded (no maxmemory on this test server) but alive: healthy for the container.
        assert subprocess.run(check, env=env, timeout=60).returncode == 0
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_metrics_logs_and_modes() -> None:
    worker = SERVICES["worker"]
    env = worker["environment"]
    port = env["VLLM_MW_METRICS_PORT"]
    assert port in [str(p) for p in worker["expose"]]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["dns_sd_configs"][0]["names"] == ["worker"]
    assert str(job["dns_sd_configs"][0]["port"]) == port
    # Logs on a bind mount (a host directory data readers can reach), where the worker writes.
    [mount] = worker["volumes"]
    source, target = mount.split(":")[:2]
    assert source.startswith("./") and target == env["VLLM_MW_LOG_DIR"]
    # The umask the worker runs under gives the same modes as the file-mode settings.
    umask = int(re.search(r"umask (0?[0-7]{3})", " ".join(worker["command"]))[1], 8)  # type: ignore[index]
    assert 0o666 & ~umask == int(env["VLLM_MW_FILE_MODE"], 8) == 0o640
    assert 0o777 & ~umask == int(env["VLLM_MW_DIR_MODE"], 8) == 0o750
    assert "exec vllm-mw worker" in worker["command"][-1]  # SIGTERM reaches the worker
    assert int(interpolate(env["VLLM_MW_RETENTION_DAYS"], {})) == 30


def test_dockerignore_keeps_secrets_and_data_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".env", ".env.*", "logs", "tests"} <= ignored
    for needed in ("client", "worker", "pyproject.toml", "README.md"):
        assert needed not in ignored


def test_grafana_dashboard_uses_exported_metrics() -> None:
    dashboard = orjson.loads((ROOT / "deploy" / "grafana-dashboard.json").read_bytes())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    names = set(re.findall(r"vllm_mw_\w+", exprs))
    exported = {
        "vllm_mw_records_written_total", "vllm_mw_records_dead_lettered_total",
        "vllm_mw_bytes_written_total", "vllm_mw_stream_lag_records",
        "vllm_mw_stream_pending_records", "vllm_mw_oldest_unwritten_age_seconds",
        "vllm_mw_batch_seconds_bucket", "vllm_mw_write_errors_total", "vllm_mw_disk_error",
        "vllm_mw_files_open",
    }  # fmt: skip
    assert names and names <= exported
