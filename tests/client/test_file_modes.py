"""File modes (issue 11 item 7): records hold prompts and answers, so nothing the library
writes is readable by other users, whatever the process umask (the tests run under 022)."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_middleware import ConfigurationError, VLLMMiddleware, load_logs
from vllm_middleware._sinks._spool import Spool
from vllm_middleware.storage import RecordEntry
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

from ..conftest import WorkerFactory, wait_for

MODEL = "vllm:qwen-2.5-omni-7b"
IMAGE = os.urandom(4000)
MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(IMAGE).decode()},
            },
        ],
    }
]


@pytest.fixture(autouse=True)
def umask_022(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)
    monkeypatch.delenv("VLLM_MW_FILE_MODE", raising=False)
    monkeypatch.delenv("VLLM_MW_DIR_MODE", raising=False)
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes_under(root: Path) -> tuple[set[int], set[int]]:
    """(file modes, directory modes) of everything below `root`, `root` itself included."""
    files: set[int] = set()
    dirs: set[int] = {stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        (dirs if path.is_dir() else files).add(stat.S_IMODE(path.lstat().st_mode))
    return files, dirs


async def test_embedded_logs_and_media_are_0640_and_0750_by_default(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"  # created by the library
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=logs, redis_url="") as client:
        await client.chat_completion(MESSAGES, model=MODEL)
    assert len(load_logs(logs)) == 1
    assert list((logs / "media").rglob("*.png"))  # media written too
    files, dirs = modes_under(logs)
    assert files == {0o640} and dirs == {0o750}


async def test_modes_from_arguments_and_from_the_environment(
    fake_vllm: FakeVLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = tmp_path / "args"
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, log_dir=logs, redis_url="", file_mode="0600", dir_mode=0o700
    ) as client:
        await client.chat_completion(MESSAGES, model=MODEL)
    assert modes_under(logs) == ({0o600}, {0o700})
    monkeypatch.setenv("VLLM_MW_FILE_MODE", "644")
    monkeypatch.setenv("VLLM_MW_DIR_MODE", "0o755")
    logs = tmp_path / "env"
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=logs, redis_url="") as client:
        await client.chat_completion(MESSAGES, model=MODEL)
    assert modes_under(logs) == ({0o644}, {0o755})


@pytest.mark.parametrize(
    ("file_mode", "dir_mode"), [("rw-r-----", None), ("0999", None), (0o1640, None), (None, "0650")]
)
def test_bad_modes_are_refused_at_construction(
    tmp_path: Path, file_mode: str | int | None, dir_mode: str | None
) -> None:
    with pytest.raises(ConfigurationError, match="_mode"):
        VLLMMiddleware(log_dir=tmp_path, redis_url="", file_mode=file_mode, dir_mode=dir_mode)


def test_the_spool_is_for_its_owner_only(tmp_path: Path) -> None:
    directory = tmp_path / "cache" / "spool" / "vllm-logs-abc"
    spool = Spool(directory, max_bytes=10**7)
    try:
        assert spool.append("b1", [RecordEntry("2025-10-21", "h", False, b'{"a":1}')])
    finally:
        spool.close()
    files, dirs = modes_under(tmp_path / "cache")
    assert files == {0o600} and dirs == {0o700}


def test_an_existing_spool_directory_left_wide_is_narrowed(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    Spool(directory, max_bytes=10**7).close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


@pytest.mark.parametrize("env", [{}, {"VLLM_MW_FILE_MODE": "0600", "VLLM_MW_DIR_MODE": "0700"}])
async def test_worker_files_get_the_modes_too(
    fake_vllm: FakeVLLMServer,
    redis_server: RedisServerProcess,
    start_worker: WorkerFactory,
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    logs = tmp_path / "logs"
    start_worker(redis_server.url, logs, "w-modes", env=env)
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, log_dir=logs, redis_url=redis_server.url
    ) as client:
        for _ in range(3):
            await client.chat_completion([{"role": "user", "content": "hi"}], model=MODEL)
    wait_for(lambda: logs.is_dir() and len(load_logs(logs)) == 3)
    want = (0o600, 0o700) if env else (0o640, 0o750)
    files, dirs = modes_under(logs)
    assert files == {want[0]} and dirs == {want[1]}
