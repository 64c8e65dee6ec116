"""Media blobs against crashes and damage: a blob is never seen under its final name unless it
is whole, and a damaged blob is never restored into a record."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from vllm_middleware import ReadStats, load_logs
from vllm_middleware_testing import FakeVLLMServer

from .test_media import MODEL, b64, blob, client_for, media_files

IMAGE = blob(300_000, 7)
MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(IMAGE)}"}},
            {"type": "text", "text": "What is this?"},
        ],
    }
]


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


async def test_an_app_killed_while_writing_a_blob_leaves_no_partial_blob(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    """The app dies (SIGXFSZ: killed by the kernel at the write that crosses its file size
    limit) in the middle of writing a 300 KB blob. A blob written in place would stay
    truncated under its final name, and never be repaired: the next store of the same image
    sees the name and skips it."""
    script = textwrap.dedent(
        """
        import asyncio, resource, signal, sys
        import orjson
        from vllm_middleware import VLLMMiddleware

        url, log_dir = sys.argv[1], sys.argv[2]
        messages = orjson.loads(open(sys.argv[3], "rb").read())
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: die as C would
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

        async def main():
            async with VLLMMiddleware(base_url=url, log_dir=log_dir, redis_url="") as client:
                await client.chat_completion(messages, model="m")

        asyncio.run(main())
        """
    )
    request = tmp_path / "messages.json"
    request.write_bytes(orjson.dumps(MESSAGES))
    argv = [sys.executable, "-c", script, fake_vllm.base_url, str(tmp_path / "logs"), str(request)]
    proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=60)
    assert proc.returncode == -25, proc.stderr.decode()  # SIGXFSZ: it died mid-write
    digest = hashlib.sha256(IMAGE).hexdigest()
    logs = tmp_path / "logs"
    assert not [p for p in media_files(logs) if p.name.startswith(digest)]
    # The same image sent again, by a process that can write: stored whole, restored exactly.
    async with client_for(fake_vllm, logs) as client:
        await client.chat_completion(MESSAGES, model=MODEL)
    (path,) = [p for p in media_files(logs) if p.name.startswith(digest)]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    stats = ReadStats()
    (record,) = load_logs(logs, restore_media=True, stats=stats)
    assert record.messages == MESSAGES and stats.media_restored == 1


async def test_a_damaged_blob_is_not_restored(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    """A blob file cut short (a crash of another tool, a disk error) must not be inlined into
    the record as if it were the original: the reference stays and is counted missing."""
    async with client_for(fake_vllm, tmp_path) as client:
        await client.chat_completion(MESSAGES, model=MODEL)
    (path,) = media_files(tmp_path)
    path.write_bytes(path.read_bytes()[: len(IMAGE) // 2])
    stats = ReadStats()
    (record,) = load_logs(tmp_path, restore_media=True, stats=stats)
    assert stats.media_restored == 0 and stats.media_missing == 1
    part = record.messages[0]["content"][0]["image_url"]["url"]
    assert isinstance(part, dict) and "media_ref" in part
