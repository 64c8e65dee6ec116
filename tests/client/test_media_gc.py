"""Media retention: media no remaining record references is deleted, and nothing else (records
in JSONL, gzip and Parquet files count; the grace period, symbolic links and an incomplete scan
keep files)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import vllm_middleware._media as media_module
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware._compress import compress_tree
from vllm_middleware._media_gc import apply_media_gc, plan_media_gc
from vllm_middleware.storage import PartitionWriter, RecordEntry
from vllm_middleware_testing import FakeVLLMServer

from ..conftest import wait_for

DAY = 86400.0
LATER = time.time() + 30 * DAY  # "now" for plans: every file is past a 7-day grace


def store(root: Path, seed: int) -> dict[str, Any]:
    """A media file as the media writer stores it, and the reference a record holds."""
    data = hashlib.sha256(str(seed).encode()).digest() * 100
    digest = hashlib.sha256(data).hexdigest()
    path = root / "media" / digest[:2] / f"{digest}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    ref = {"sha256": digest, "mime": "image/png", "bytes": len(data), "stored": True}
    ref.update(path=f"media/{digest[:2]}/{digest}.png", encoding="base64")
    return {"media_ref": ref}


def path_of(root: Path, ref: dict[str, Any]) -> Path:
    digest = ref["media_ref"]["sha256"]
    return root / "media" / digest[:2] / f"{digest}.png"


def write(root: Path, day: str, refs: list[dict[str, Any]], host: str = "h") -> None:
    writer = PartitionWriter(root, "w1", fsync=False)
    for i, ref in enumerate(refs):
        record = {"request_id": f"req_{day}_{i}", "messages": [{"role": "user", "content": [ref]}]}
        writer.write_batch([RecordEntry(day, host, False, orjson.dumps(record))])
    writer.close()


def test_deletes_only_unreferenced_media_past_the_grace_period(tmp_path: Path) -> None:
    kept, orphan = store(tmp_path, 1), store(tmp_path, 2)
    write(tmp_path, "2026-01-01", [kept, kept])
    plan = plan_media_gc(tmp_path, grace_s=7 * DAY, now=LATER)
    assert plan.refused is None and plan.referenced >= 1
    assert [f.name for f in plan.delete] == [path_of(tmp_path, orphan).name]
    result = apply_media_gc(plan)
    assert result.deleted == 1 and result.bytes == 3200 and result.errors == []
    assert path_of(tmp_path, kept).exists() and not path_of(tmp_path, orphan).exists()
    assert len(load_logs(tmp_path, restore_media=True)) == 2


def test_media_within_the_grace_period_is_kept(tmp_path: Path) -> None:
    orphan = store(tmp_path, 2)
    plan = plan_media_gc(tmp_path, grace_s=7 * DAY)  # written just now: may be in flight
    assert plan.delete == [] and plan.kept_recent == 1
    assert path_of(tmp_path, orphan).exists()


def test_references_in_gzip_and_parquet_files_count(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    from vllm_middleware._compact import compact_tree

    in_gz, in_parquet, orphan = store(tmp_path, 1), store(tmp_path, 2), store(tmp_path, 3)
    write(tmp_path, "2026-01-01", [in_gz])
    write(tmp_path, "2026-01-02", [in_parquet])
    assert compress_tree(tmp_path, day="2026-01-01", min_age_s=0).compressed == 1
    assert compact_tree(tmp_path, day="2026-01-02", min_age_s=0).records == 1
    assert list(tmp_path.rglob("*.jsonl")) == []
    apply_media_gc(plan_media_gc(tmp_path, now=LATER))
    assert path_of(tmp_path, in_gz).exists() and path_of(tmp_path, in_parquet).exists()
    assert not path_of(tmp_path, orphan).exists()


def test_an_incomplete_scan_deletes_nothing(tmp_path: Path) -> None:
    orphan = store(tmp_path, 2)
    write(tmp_path, "2026-01-01", [])
    elsewhere = tmp_path.parent / f"{tmp_path.name}-other.jsonl"
    elsewhere.write_bytes(orjson.dumps({"x": store(tmp_path, 3)}) + b"\n")
    link_dir = tmp_path / "date=2026-01-01" / "host=h"
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "linked.jsonl").symlink_to(elsewhere)  # the reader does not follow it
    plan = plan_media_gc(tmp_path, now=LATER)
    assert plan.refused is not None and "symbolic links" in plan.refused
    assert apply_media_gc(plan).deleted == 0
    assert path_of(tmp_path, orphan).exists()


def test_symbolic_links_in_the_media_store_are_never_followed(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    outside = tmp_path / "outside"
    victim = store(outside, 1)  # unreferenced, old, but not under log_dir/media
    digest = victim["media_ref"]["sha256"]
    (root / "media").mkdir(parents=True)
    (root / "media" / digest[:2]).symlink_to(outside / "media" / digest[:2])
    (root / "media" / "ff").mkdir()
    (root / "media" / "ff" / f"{'f' * 64}.png").symlink_to(path_of(outside, victim))
    plan = plan_media_gc(root, now=LATER)
    assert plan.delete == []
    assert apply_media_gc(plan).deleted == 0
    assert path_of(outside, victim).exists()
    # a media directory that is itself a link is not a media store of this tree
    (root / "media").rename(root / "media-real")
    (root / "media").symlink_to(outside / "media")
    assert plan_media_gc(root, now=LATER).delete == []


def test_a_file_touched_after_the_plan_is_kept(tmp_path: Path) -> None:
    orphan = store(tmp_path, 2)
    plan = plan_media_gc(tmp_path, now=LATER)
    assert len(plan.delete) == 1
    os.utime(path_of(tmp_path, orphan))  # a new record references it again
    assert apply_media_gc(plan).deleted == 0
    assert path_of(tmp_path, orphan).exists()


def vllm_mw(*args: str) -> tuple[int, dict[str, Any]]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    result = subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", *args, "--json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_retention_command_deletes_the_media_of_deleted_partitions(tmp_path: Path) -> None:
    old_only, shared = store(tmp_path, 1), store(tmp_path, 2)
    write(tmp_path, "2020-01-01", [old_only, shared])
    today = time.strftime("%Y-%m-%d", time.gmtime())
    write(tmp_path, today, [shared])
    past = time.time() - 30 * DAY
    for path in tmp_path.rglob("*"):
        os.utime(path, (past, past))
    # ctime cannot be set back: a grace of 0 days stands for "older than the grace period"
    common = ("--keep-days", "3", "--log-dir", str(tmp_path), "--media-grace-days", "0")
    code, report = vllm_mw("retention", *common, "--dry-run")
    assert code == 0 and report["media"]["files"] == 1 and report["media"]["refused"] is None
    assert path_of(tmp_path, old_only).exists()
    code, report = vllm_mw("retention", *common)
    assert code == 0 and report["deleted"] == ["2020-01-01"]
    assert report["media"]["deleted"] == 1
    assert not path_of(tmp_path, old_only).exists() and path_of(tmp_path, shared).exists()
    code, report = vllm_mw("retention", *common, "--keep-media")
    assert code == 0 and "media" not in report


async def test_a_reused_blob_refreshes_its_file_and_a_deleted_one_is_written_again(
    fake_vllm: FakeVLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)
    image = hashlib.sha256(b"img").digest() * 1000
    url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    digest = hashlib.sha256(image).hexdigest()
    stored = tmp_path / "media" / digest[:2] / f"{digest}.png"
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, redis_url="") as c:
        await c.chat_completion(messages, model="vllm:qwen-2.5-omni-7b")
    past = time.time() - 30 * DAY
    os.utime(stored, (past, past))
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, redis_url="") as c:
        await c.chat_completion(messages, model="vllm:qwen-2.5-omni-7b")  # deduplicated
        wait_for(lambda: stored.stat().st_mtime > past + DAY)  # the file is touched
        monkeypatch.setattr(media_module, "_TOUCH_S", 0.0)
        stored.unlink()  # taken by media retention meanwhile
        await c.chat_completion(messages, model="vllm:qwen-2.5-omni-7b")
    assert stored.read_bytes() == image
    assert len(load_logs(tmp_path, restore_media=True)) == 3
