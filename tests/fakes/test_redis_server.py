"""RedisServerProcess: a real redis-server with restart, kill and pause for fault injection."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from vllm_middleware_testing import RedisServerError, RedisServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServerProcess]:
    with RedisServerProcess(tmp_dir=tmp_path / "redis") as proc:
        yield proc


def test_start_serves_on_url_and_writes_log(server: RedisServerProcess) -> None:
    assert server.running
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
    assert server.log_path.exists()
    assert server.ping()


def test_stop_is_idempotent_and_start_again_keeps_port(server: RedisServerProcess) -> None:
    port = server.port
    server.stop()
    server.stop()
    assert not server.running
    assert not server.ping(timeout=0.2)
    server.start()
    assert server.port == port
    assert server.ping()


def test_aof_survives_sigkill_restart_on_same_port(tmp_path: Path) -> None:
    with RedisServerProcess(tmp_dir=tmp_path, appendonly=True) as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        client.xadd("s", {"f": "1"})
        client.set("k", "v")
        client.close()
        server.kill()
        assert not server.running
        server.restart()
        assert server.port == port
        client = redis.Redis.from_url(server.url)
        assert client.get("k") == b"v"
        assert client.xlen("s") == 1
        client.close()


def test_restart_kill_flag_and_graceful_restart(tmp_path: Path) -> None:
    with RedisServerProcess(tmp_dir=tmp_path, appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        client.set("a", "1")
        server.restart(kill=True)
        client.set("b", "2")
        server.restart()
        assert client.mget("a", "b") == [b"1", b"2"]  # redis-py reconnects by itself
        client.close()


def test_start_returns_only_after_the_aof_is_loaded(tmp_path: Path) -> None:
    # Redis answers INFO while it loads the AOF but refuses data commands with LOADING; a slow
    # load (delayed per key, events served often) makes that window wide enough to hit.
    slow_load = ["--key-load-delay", "100", "--loading-process-events-interval-bytes", "1024"]
    with RedisServerProcess(tmp_dir=tmp_path, appendonly=True, extra_args=slow_load) as server:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"k{i}", "v")
        pipe.execute()
        client.bgrewriteaof()  # the delay applies to the RDB base file the rewrite makes
        while client.info("persistence")["aof_rewrite_in_progress"]:
            time.sleep(0.05)
        server.restart(kill=True)
        client.set("after", "restart")  # BusyLoadingError if start() returned mid-load
        assert client.dbsize() == 3001
        client.close()


def test_without_aof_kill_loses_data(tmp_path: Path) -> None:
    with RedisServerProcess(tmp_dir=tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.kill()
        server.start()
        assert client.get("k") is None
        client.close()


def test_pause_makes_clients_time_out_and_resume_recovers(server: RedisServerProcess) -> None:
    client = redis.Redis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    client.set("k", "v")
    server.pause()
    assert server.paused
    started = time.monotonic()
    with pytest.raises(redis.exceptions.TimeoutError):
        client.get("k")
    assert time.monotonic() - started < 5
    assert not server.ping(timeout=0.2)
    server.resume()
    assert not server.paused
    assert client.get("k") == b"v"
    client.close()


def test_stop_while_paused(server: RedisServerProcess) -> None:
    server.pause()
    started = time.monotonic()
    server.stop()
    assert not server.running
    assert time.monotonic() - started < 10


def test_password_in_url_and_required(tmp_path: Path) -> None:
    with RedisServerProcess(tmp_dir=tmp_path, password="s3cr:t/") as server:
        assert server.url.startswith("redis://:s3cr%3At%2F@127.0.0.1:")
        assert server.ping()
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.get("k")
        anonymous.close()


def test_maxmemory_and_extra_args(tmp_path: Path) -> None:
    with RedisServerProcess(
        tmp_dir=tmp_path, maxmemory="10mb", extra_args=["--maxmemory-policy", "noeviction"]
    ) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.config_get("maxmemory")["maxmemory"] == str(10 * 1024 * 1024)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()


def test_explicit_port_is_used(tmp_path: Path) -> None:
    with RedisServerProcess(tmp_dir=tmp_path) as first:
        port = first.port
    with RedisServerProcess(tmp_dir=tmp_path, port=port) as second:
        assert second.port == port
        assert second.ping()


def test_owned_temp_dir_is_removed_on_exit() -> None:
    with RedisServerProcess() as server:
        directory = server.dir
        assert directory.is_dir()
    assert not directory.exists()


def test_missing_binary_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    server = RedisServerProcess(tmp_dir=tmp_path)
    with pytest.raises(RedisServerError, match="redis-server not found"):
        server.start()


def test_bad_config_reports_log(tmp_path: Path) -> None:
    server = RedisServerProcess(tmp_dir=tmp_path, extra_args=["--no-such-option", "1"])
    with pytest.raises(RedisServerError, match="exited"):
        server.start()
    assert not server.running


def test_url_is_known_before_start(tmp_path: Path) -> None:
    server = RedisServerProcess(tmp_dir=tmp_path)
    url = server.url
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    with server:
        assert server.url == url
        assert client.ping()
    client.close()


def test_port_taken_by_another_process(tmp_path: Path) -> None:
    with RedisServerProcess(tmp_dir=tmp_path / "a") as first:
        second = RedisServerProcess(tmp_dir=tmp_path / "b", port=first.port)
        with pytest.raises(RedisServerError, match="Address already in use"):
            second.start()
