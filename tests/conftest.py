"""Shared fixtures: private redis-server processes, the fake vLLM server, worker processes."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess
from vllm_middleware_worker import StreamConsumer, WorkerConfig, open_consumer_redis

_HAVE_ARQ = importlib.util.find_spec("arq") is not None


# The directories whose every test needs the worker (and so arq).
_WORKER_DIRS = (Path(__file__).parent / "worker", Path(__file__).parent / "pipeline")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without arq (the client-only environment on the newest redis-py, which arq does not
    allow), the worker's and the end-to-end tests skip, and so do client tests that start
    worker processes, saying why."""
    if _HAVE_ARQ:
        return
    skip = pytest.mark.skip(reason="needs the [worker] extra (arq), not in this environment")
    for item in items:
        in_worker_dir = any(item.path.is_relative_to(folder) for folder in _WORKER_DIRS)
        if in_worker_dir or "start_worker" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's Redis clients spool into its temp dir, never into ~/.cache."""
    path = tmp_path / "spool"
    monkeypatch.setenv("VLLM_MW_SPOOL_DIR", str(path))
    return path


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServerProcess]:
    """A private redis-server on a free port, with its data in the test's temp dir."""
    (tmp_path / "redis").mkdir()
    server = RedisServerProcess(tmp_dir=tmp_path / "redis", appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis(redis_server: RedisServerProcess) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of `redis_server`."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def drain(cfg: WorkerConfig, timeout: float = 30) -> StreamConsumer:
    """Run an in-process consumer with `cfg` until the stream is drained (burst mode)."""
    client = open_consumer_redis(cfg)
    consumer = StreamConsumer(client, cfg)
    try:
        await asyncio.wait_for(consumer.run(burst=True), timeout)
    finally:
        await client.aclose()
    return consumer


@pytest.fixture(scope="session")
def fake_vllm() -> Iterator[FakeVLLMServer]:
    """The newer (v0.33) fake vLLM server, shared by the session (it keeps no state we assert)."""
    with FakeVLLMServer() as server:
        yield server


@pytest.fixture(params=["v0.33", "v0.10.2"])
def fake_vllm_any(request: pytest.FixtureRequest) -> Iterator[FakeVLLMServer]:
    """A fake vLLM server in each wire flavour."""
    with FakeVLLMServer(flavor=request.param) as server:
        yield server


WorkerFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start `python -m vllm_middleware_worker` processes; all are stopped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        redis_url: str,
        log_dir: Path,
        consumer: str,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        environment = dict(os.environ)
        environment.update(
            VLLM_MW_STATS_INTERVAL_S="1",
            VLLM_MW_HEARTBEAT_TTL_S="3",
            VLLM_MW_CLAIM_INTERVAL_S="1",
        )
        environment.update(env or {})
        log = open(tmp_path / f"worker-{consumer}.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm_middleware_worker",
                "--redis-url",
                redis_url,
                "--log-dir",
                str(log_dir),
                "--consumer",
                consumer,
                *extra,
            ],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        return proc

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll until `predicate()` is true; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)
