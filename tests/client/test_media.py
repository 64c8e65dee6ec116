"""Multimodal media in records: reference / drop / inline policies, restore, size cap."""

from __future__ import annotations

import base64
import copy
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import vllm_middleware._media as media_module
from vllm_middleware import ConfigurationError, ReadStats, VLLMMiddleware, load_logs
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

from ..conftest import WorkerFactory, wait_for

MODEL = "vllm:qwen-2.5-omni-7b"


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


def blob(size: int, seed: int = 0) -> bytes:
    # Deterministic, incompressible-looking bytes (distinct per seed).
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IMAGE = blob(50_000, 1)
AUDIO = blob(40_000, 2)
VIDEO = blob(60_000, 3)
REPLY_AUDIO = blob(30_000, 4)


def omni_messages() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are Qwen."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(IMAGE)}"}},
                {"image_url": f"data:image/jpeg;base64,{b64(IMAGE)}"},  # bare form
                {"type": "input_audio", "input_audio": {"data": b64(AUDIO), "format": "wav"}},
                {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64(AUDIO)}"}},
                {"video_url": {"url": f"data:video/mp4;base64,{b64(VIDEO)}"}, "type": "video_url"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "text", "text": "Describe what you hear and see."},
            ],
        },
    ]


def client_for(server: FakeVLLMServer, tmp_path: Path, **kwargs: Any) -> VLLMMiddleware:
    return VLLMMiddleware(base_url=server.base_url, log_dir=tmp_path, redis_url="", **kwargs)


def media_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "media"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def ref_of(value: Any) -> dict[str, Any]:
    assert isinstance(value, dict) and set(value) == {"media_ref"}, value
    ref: dict[str, Any] = value["media_ref"]
    return ref


async def test_reference_policy_moves_every_blob_to_a_file(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    messages = omni_messages()
    before = copy.deepcopy(messages)
    async with client_for(fake_vllm, tmp_path) as client:
        await client.chat_completion(messages, model=MODEL)
    stats = client.get_statistics()["client"]
    assert messages == before  # the caller's objects are untouched
    (record,) = load_logs(tmp_path)
    parts = record["messages"][1]["content"]
    png = ref_of(parts[0]["image_url"]["url"])
    assert png["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    assert png["mime"] == "image/png" and png["bytes"] == len(IMAGE)
    assert png["stored"] is True and png["encoding"] == "data_url"
    assert png["path"] == f"media/{png['sha256'][:2]}/{png['sha256']}.png"
    assert (tmp_path / png["path"]).read_bytes() == IMAGE
    jpeg = ref_of(parts[1]["image_url"])  # the bare form keeps its place
    assert jpeg["path"].endswith(".jpg") and (tmp_path / jpeg["path"]).read_bytes() == IMAGE
    audio = ref_of(parts[2]["input_audio"]["data"])
    assert parts[2]["input_audio"]["format"] == "wav"
    assert audio["encoding"] == "base64" and audio["mime"] == "audio/wav"
    assert ref_of(parts[3]["audio_url"]["url"])["sha256"] == audio["sha256"]
    video = ref_of(parts[4]["video_url"]["url"])
    assert (tmp_path / video["path"]).read_bytes() == VIDEO
    assert parts[5] == before[1]["content"][5] and parts[6] == before[1]["content"][6]
    # png, jpg, wav (input_audio and audio_url share it), mp4
    assert len(media_files(tmp_path)) == 4
    assert stats["media_stored"] == 4 and stats["media_deduplicated"] == 1
    assert stats["media_pending"] == 0 and stats["truncated"] == 0
    # The record is small: the blobs are not in it.
    assert len(orjson.dumps(record.to_dict())) < 5_000


async def test_restore_round_trip_equals_the_request(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    messages = omni_messages()
    # A data URL with parameters in its header must come back byte for byte too.
    odd = {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;name=a.png;base64,{b64(VIDEO)}"},
    }
    messages[1]["content"].append(odd)
    async with client_for(fake_vllm, tmp_path) as client:
        await client.chat_completion(messages, model=MODEL)
    stats = ReadStats()
    (restored,) = load_logs(tmp_path, restore_media=True, stats=stats)
    assert restored.messages == messages
    assert stats.media_restored == 6 and stats.media_missing == 0
    (plain,) = load_logs(tmp_path)  # without the option, references stay
    assert plain.messages != messages


async def test_restore_counts_missing_files(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with client_for(fake_vllm, tmp_path) as client:
        await client.chat_completion(omni_messages(), model=MODEL)
    for path in media_files(tmp_path):
        if path.suffix == ".mp4":
            path.unlink()
    stats = ReadStats()
    (record,) = load_logs(tmp_path, restore_media=True, stats=stats)
    assert stats.media_missing == 1 and stats.media_restored == 4
    assert ref_of(record["messages"][1]["content"][4]["video_url"]["url"])["mime"] == "video/mp4"
    # An explicit media_dir is where references are looked up.
    elsewhere = ReadStats()
    load_logs(tmp_path, restore_media=True, media_dir=tmp_path / "nowhere", stats=elsewhere)
    assert elsewhere.media_missing == 5 and elsewhere.media_restored == 0


async def test_drop_policy_keeps_hash_and_size_only(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    async with client_for(fake_vllm, tmp_path, media_policy="drop") as client:
        await client.chat_completion(omni_messages(), model=MODEL)
    (record,) = load_logs(tmp_path)
    ref = ref_of(record["messages"][1]["content"][0]["image_url"]["url"])
    assert ref["stored"] is False and "path" not in ref
    assert ref["sha256"] == hashlib.sha256(IMAGE).hexdigest() and ref["bytes"] == len(IMAGE)
    assert media_files(tmp_path) == []
    stats = ReadStats()
    load_logs(tmp_path, restore_media=True, stats=stats)
    assert stats.media_missing == 5 and stats.media_restored == 0


async def test_inline_policy_keeps_the_data(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    messages = omni_messages()
    async with client_for(fake_vllm, tmp_path, media_policy="inline") as client:
        await client.chat_completion(messages, model=MODEL)
        assert client.get_statistics()["client"]["media_policy"] == "inline"
    (record,) = load_logs(tmp_path)
    assert record.messages == messages
    assert media_files(tmp_path) == []


async def test_small_and_non_base64_blobs_stay_inline(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    tiny = f"data:image/png;base64,{b64(b'x' * 100)}"
    not_base64 = "data:image/png;base64," + "!" * 5000
    not_canonical = "data:image/png;base64," + b64(IMAGE)[:-2] + "B="  # non-zero padding bits
    url_encoded = "data:text/plain," + "a" * 5000
    messages = [
        {
            "role": "user",
            "content": [{"image_url": value} for value in (tiny, not_base64, url_encoded)]
            + [{"type": "image_url", "image_url": {"url": not_canonical}}],
        }
    ]
    async with client_for(fake_vllm, tmp_path) as client:
        await client.chat_completion(messages, model=MODEL)
    stats = client.get_statistics()["client"]
    (record,) = load_logs(tmp_path)
    assert record.messages == messages
    assert stats["media_kept_inline"] == 2 and media_files(tmp_path) == []


async def test_identical_blobs_are_written_once(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    url = f"data:image/png;base64,{b64(IMAGE)}"
    part = {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "user", "content": [part, part, {"type": "text", "text": "twice"}]}]
    async with client_for(fake_vllm, tmp_path) as client:
        for _ in range(3):
            await client.chat_completion(messages, model=MODEL)
    stats = client.get_statistics()["client"]
    assert len(media_files(tmp_path)) == 1
    assert stats["media_stored"] == 1 and stats["media_deduplicated"] == 5
    assert not list((tmp_path / "media").rglob("*.tmp"))
    records = load_logs(tmp_path, restore_media=True)
    assert len(records) == 3 and all(r.messages == messages for r in records)


async def test_plain_text_request_is_unaffected(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    async with client_for(fake_vllm, tmp_path) as client:
        result = await client.chat_completion(messages, model=MODEL)
        assert client._media is not None
        record: dict[str, Any] = {"messages": messages, "response": result}
        assert client._media.prepare(record) is None
        assert record["messages"] is messages and record["response"] is result
    stats = client.get_statistics()["client"]
    (logged,) = load_logs(tmp_path)
    assert logged.messages == messages and logged.response == result
    assert stats["media_stored"] == 0 and not (tmp_path / "media").exists()


async def test_later_changes_by_the_caller_do_not_reach_the_record(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    messages = omni_messages()
    expected = copy.deepcopy(messages)
    async with client_for(fake_vllm, tmp_path) as client:
        result = await client.chat_completion(messages, model=MODEL)
        # Usual chat bookkeeping right after the call, while the media thread still works.
        messages.append(result["choices"][0]["message"])
        messages[0]["content"] = "changed"
        result["choices"].clear()
    (record,) = load_logs(tmp_path, restore_media=True)
    assert record.messages == expected
    assert record["response"]["choices"]


async def test_streaming_request_with_media(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    messages = omni_messages()
    async with client_for(fake_vllm, tmp_path) as client:
        stream = await client.chat_completion(messages, model=MODEL, stream=True)
        async with stream:
            chunks = [chunk async for chunk in stream]
    assert chunks
    (record,) = load_logs(tmp_path)
    assert record.stream is True and record.stream_end == "completed"
    ref_of(record["messages"][1]["content"][0]["image_url"]["url"])
    (restored,) = load_logs(tmp_path, restore_media=True)
    assert restored.messages == messages


# -- response audio (vllm-omni); the fake server has no speech output: MockTransport -----------
def omni_response() -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello."},
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "audio": {
                        "id": "audio-0123456789abcdef",
                        "data": b64(REPLY_AUDIO),
                        "expires_at": 2,
                        "transcript": "",
                    },
                },
                "finish_reason": "stop",
            },
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def mock_client(tmp_path: Path, body: bytes, content_type: str, **kwargs: Any) -> VLLMMiddleware:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x/v1")
    return VLLMMiddleware("http://x/v1", log_dir=tmp_path, redis_url="", http_client=http, **kwargs)


async def test_response_audio_is_referenced(tmp_path: Path) -> None:
    expected = omni_response()
    client = mock_client(tmp_path, orjson.dumps(expected), "application/json")
    result = await client.chat_completion([{"role": "user", "content": "speak"}], model=MODEL)
    snapshot = copy.deepcopy(result)
    await client.close()
    await client._http.aclose()
    assert result == expected == snapshot
    (record,) = load_logs(tmp_path)
    audio = record["response"]["choices"][1]["message"]["audio"]
    ref = ref_of(audio["data"])
    assert ref["mime"] == "audio/wav" and ref["bytes"] == len(REPLY_AUDIO)
    assert audio["id"] == "audio-0123456789abcdef"
    assert (tmp_path / ref["path"]).read_bytes() == REPLY_AUDIO
    assert record.usage == expected["usage"]
    (restored,) = load_logs(tmp_path, restore_media=True)
    assert restored.response == expected


async def test_streamed_response_audio_is_referenced(tmp_path: Path) -> None:
    base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    audio = {"id": "audio-1", "data": b64(REPLY_AUDIO), "expires_at": 2, "transcript": ""}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {**base, "choices": [{"index": 1, "delta": {"role": "assistant", "audio": audio}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]},
    ]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    client = mock_client(tmp_path, body, "text/event-stream")
    stream = await client.chat_completion([{"role": "user", "content": "speak"}], stream=True)
    got = [chunk async for chunk in stream]
    await client.close()
    await client._http.aclose()
    assert got == events  # what the caller saw is untouched
    (record,) = load_logs(tmp_path)
    ref = ref_of(record["response"]["choices"][1]["message"]["audio"]["data"])
    assert (tmp_path / ref["path"]).read_bytes() == REPLY_AUDIO
    (restored,) = load_logs(tmp_path, restore_media=True)
    assert restored["response"]["choices"][1]["message"]["audio"] == audio


# -- size cap --------------------------------------------------------------------------------
async def test_oversized_plain_record_is_truncated_and_counted(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "long " * 20_000}]
    async with client_for(fake_vllm, tmp_path, max_record_bytes=64 * 1024) as client:
        await client.chat_completion(messages, model=MODEL, temperature=0.5, metadata={"k": 1})
        await client.chat_completion([{"role": "user", "content": "short"}], model=MODEL)
    stats = client.get_statistics()["client"]
    assert stats["truncated"] == 1
    big, small = sorted(load_logs(tmp_path), key=lambda r: "truncated" in r)[::-1]
    assert big["truncated"]["original_bytes"] > 64 * 1024
    assert "max_record_bytes" in big["truncated"]["reason"]
    assert big.messages is None and big.response is None
    assert big.model == MODEL and big.status_code == 200 and big["usage"]["prompt_tokens"] > 0
    assert big.parameters == {"temperature": 0.5} and big.metadata == {"k": 1}
    assert big.latency_ms is not None and big.request_id and big.host
    assert small.truncated is None and small["messages"][0]["content"] == "short"


async def test_inline_media_over_the_cap_is_truncated(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    kwargs: dict[str, Any] = {"media_policy": "inline", "max_record_bytes": 100_000}
    async with client_for(fake_vllm, tmp_path, **kwargs) as client:
        await client.chat_completion(omni_messages(), model=MODEL)
    assert client.get_statistics()["client"]["truncated"] == 1
    (record,) = load_logs(tmp_path)
    assert record["truncated"]["original_bytes"] > 300_000


async def test_record_over_the_cap_after_references_is_truncated(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    messages = omni_messages()
    messages[1]["content"].append({"type": "text", "text": "x" * 200_000})
    async with client_for(fake_vllm, tmp_path, max_record_bytes=100_000) as client:
        await client.chat_completion(messages, model=MODEL)
    assert client.get_statistics()["client"]["truncated"] == 1
    (record,) = load_logs(tmp_path)
    assert record["truncated"]["original_bytes"] > 200_000 and record.model == MODEL
    assert len(media_files(tmp_path)) == 4  # the blobs were still stored


# -- robustness ------------------------------------------------------------------------------
async def test_media_write_failure_is_counted_and_the_record_kept(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    async with client_for(fake_vllm, tmp_path, media_dir=blocker) as client:
        await client.chat_completion(omni_messages(), model=MODEL)
    stats = client.get_statistics()["client"]
    assert stats["media_failed"] == 5 and stats["logging_errors"] == 0
    (record,) = load_logs(tmp_path)
    ref = ref_of(record["messages"][1]["content"][0]["image_url"]["url"])
    assert ref["stored"] is False and "error" in ref


async def test_close_waits_for_pending_media(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    client = client_for(fake_vllm, tmp_path)
    big = f"data:image/png;base64,{b64(blob(3_000_000, 9))}"
    messages = [{"role": "user", "content": [{"image_url": big}] * 3}]
    for _ in range(3):
        await client.chat_completion(messages, model=MODEL)
    await client.close()
    assert len(load_logs(tmp_path)) == 3
    assert client.get_statistics()["client"]["media_pending"] == 0


async def test_custom_media_dir_and_restore(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    logs, shared = tmp_path / "logs", tmp_path / "shared-media"
    messages = omni_messages()
    async with client_for(fake_vllm, logs, media_dir=shared) as client:
        await client.chat_completion(messages, model=MODEL)
    (record,) = load_logs(logs)
    ref = ref_of(record["messages"][1]["content"][0]["image_url"]["url"])
    assert ref["path"].startswith("../shared-media/") and (logs / ref["path"]).is_file()
    (restored,) = load_logs(logs, restore_media=True, media_dir=shared)
    assert restored.messages == messages


def test_media_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        VLLMMiddleware(log_dir=tmp_path, redis_url="", media_policy="keep")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        VLLMMiddleware(log_dir=tmp_path, redis_url="", max_record_bytes=0)
    with pytest.raises(ConfigurationError):
        VLLMMiddleware(log_dir=tmp_path, redis_url="", media_min_bytes=-1)


async def test_redis_mode_without_media_dir_falls_back_to_drop(
    fake_vllm: FakeVLLMServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(media_module, "_warned_shared", False)
    url = "redis://127.0.0.1:1/0"  # nothing listens: records go to the spool
    with caplog.at_level(logging.WARNING, logger="vllm_middleware"):
        first = VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, redis_url=url)
        second = VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, redis_url=url)
        assert first.media_policy == second.media_policy == "drop"
        await first.chat_completion([{"role": "user", "content": "text only"}], model=MODEL)
        # No blob met yet: nothing to warn about.
        assert not [r for r in caplog.records if "shared" in r.getMessage()]
        for client in (first, second, first):
            await client.chat_completion(omni_messages(), model=MODEL)
    assert sum("shared" in r.getMessage() for r in caplog.records) == 1  # warned once
    shared = VLLMMiddleware(log_dir=tmp_path, redis_url=url, media_dir=tmp_path / "m")
    assert shared.media_policy == "reference"
    for client in (first, second, shared):
        await client.close(timeout=1)


async def test_large_image_does_not_block_the_loop(
    fake_vllm: FakeVLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the loop must never do with a large blob: decode, hash or write it (the media
    # thread's work), or encode it into a record. Checked by the thread each step runs on and
    # the size of what the loop encodes, not by the clock: a loaded machine stretches every
    # loop turn, and a timed bound either flakes or is too loose to catch anything.
    image = f"data:image/jpeg;base64,{b64(os.urandom(5_000_000))}"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]
    loop_thread = threading.get_ident()
    encoded_on_loop: list[int] = []
    resolved_on: list[int] = []
    encode = media_module.encode_record

    def watched_encode(record: Any) -> bytes:
        data = encode(record)
        if threading.get_ident() == loop_thread:
            encoded_on_loop.append(len(data))
        return data

    monkeypatch.setattr(media_module, "encode_record", watched_encode)
    async with client_for(fake_vllm, tmp_path) as client:
        assert client._media is not None
        resolve = client._media.resolve

        def watched_resolve(job: Any, data: bytes) -> bytes:
            resolved_on.append(threading.get_ident())
            return resolve(job, data)

        monkeypatch.setattr(client._media, "resolve", watched_resolve)
        await client.chat_completion([{"role": "user", "content": "warm up"}], model=MODEL)
        for _ in range(3):
            await client.chat_completion(messages, model=MODEL)
    assert len(resolved_on) == 3 and loop_thread not in resolved_on
    assert len(encoded_on_loop) == 3 and max(encoded_on_loop) < 10_000, encoded_on_loop
    assert len(load_logs(tmp_path)) == 4 and len(media_files(tmp_path)) == 1


async def test_media_thread_failure_is_counted_never_raised(
    fake_vllm: FakeVLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(job: Any, data: bytes) -> bytes:
        raise RuntimeError("boom")

    async with client_for(fake_vllm, tmp_path) as client:
        assert client._media is not None
        monkeypatch.setattr(client._media, "resolve", broken)
        result = await client.chat_completion(omni_messages(), model=MODEL)
        await client.chat_completion([{"role": "user", "content": "text only"}], model=MODEL)
    assert result["choices"]
    assert client.get_statistics()["client"]["logging_errors"] == 1
    (record,) = load_logs(tmp_path)  # the media record is lost, counted; the other is kept
    assert record["messages"][0]["content"] == "text only"


async def test_redis_mode_with_a_shared_media_dir_restores_through_the_worker(
    fake_vllm: FakeVLLMServer,
    redis_server: RedisServerProcess,
    start_worker: WorkerFactory,
    tmp_path: Path,
) -> None:
    """The whole pipeline: blobs go to the shared media dir from the app, the record (with
    references) through Redis and a worker process into the files, and a reader restores it."""
    logs, shared = tmp_path / "logs", tmp_path / "shared-media"
    start_worker(redis_server.url, logs, "w-media")
    messages = omni_messages()
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, log_dir=logs, redis_url=redis_server.url, media_dir=shared
    ) as client:
        assert client.media_policy == "reference"
        for _ in range(3):  # identical blobs: stored once, referenced by three records
            await client.chat_completion(messages, model=MODEL)
    wait_for(lambda: logs.is_dir() and len(load_logs(logs)) == 3)
    records = load_logs(logs)
    raw = orjson.dumps([r["messages"] for r in records])
    assert b64(IMAGE).encode() not in raw and b64(VIDEO).encode() not in raw  # referenced
    # Content-addressed: png, jpeg, wav, mp4 (one image under two types), whatever the count.
    assert len([p for p in shared.rglob("*") if p.is_file()]) == 4
    stats = ReadStats()
    restored = load_logs(logs, restore_media=True, media_dir=shared, stats=stats)
    assert [r.messages for r in restored] == [messages] * 3
    assert stats.media_missing == 0 and stats.media_restored == 15  # 5 blobs x 3 records


# -- issue 11 item 6: restore reads nothing outside media_dir -------------------------------------
SECRET = b"db_password=hunter2\n"


def planted(sha256: Any, path: Any, size: Any = None, **extra: Any) -> dict[str, Any]:
    size = len(SECRET) if size is None else size
    ref = {"sha256": sha256, "mime": "text/plain", "bytes": size, "path": path, "stored": True}
    return {"media_ref": {**ref, **extra}}


async def test_a_media_ref_sent_by_a_caller_cannot_read_local_files(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    """End to end, as reported: a content part holding a forged reference, sent through
    chat_completion, must not make the reader inline a file outside media_dir."""
    (tmp_path / "notes.txt").write_bytes(SECRET)
    forged = [
        planted("..aa", "notes.txt"),  # media/../notes.txt
        planted("/" + "." * 2, "notes.txt"),
        planted(hashlib.sha256(SECRET).hexdigest(), "../../notes.txt"),
        planted(hashlib.sha256(SECRET).hexdigest(), "notes.txt"),
    ]
    messages = [{"role": "user", "content": [*forged, {"type": "text", "text": "hi"}]}]
    async with client_for(fake_vllm, tmp_path) as client:
        await client.chat_completion(messages, model=MODEL)
    stats = ReadStats()
    (record,) = load_logs(tmp_path, restore_media=True, stats=stats)
    assert SECRET.decode() not in orjson.dumps(record.to_dict()).decode()
    assert b64(SECRET) not in orjson.dumps(record.to_dict()).decode()
    assert record["messages"][0]["content"][:4] == forged  # left as they are
    assert stats.media_restored == 0 and stats.media_refused == 4


def write_record(log_dir: Path, *values: Any) -> None:
    path = log_dir / "date=2025-10-21/host=a/w.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"request_id": "r1", "timestamp": "2025-10-21T10:00:00+00:00", "values": list(values)}
    path.write_bytes(orjson.dumps(record) + b"\n")


def restore(log_dir: Path) -> tuple[list[Any], ReadStats]:
    stats = ReadStats()
    (record,) = load_logs(log_dir, restore_media=True, stats=stats)
    return record["values"], stats


def test_restore_refuses_a_symlink_in_the_media_store(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(SECRET)
    digest = hashlib.sha256(SECRET).hexdigest()
    store = tmp_path / "media" / digest[:2]
    store.mkdir(parents=True)
    (store / f"{digest}.bin").symlink_to(outside)
    # A linked shard directory is refused too.
    other = hashlib.sha256(SECRET + b"2").hexdigest()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / f"{other}.bin").write_bytes(SECRET + b"2")
    (tmp_path / "media" / other[:2]).symlink_to(tmp_path / "elsewhere")
    write_record(
        tmp_path,
        planted(digest, f"media/{digest[:2]}/{digest}.bin"),
        planted(other, f"media/{other[:2]}/{other}.bin", size=len(SECRET) + 1),
    )
    values, stats = restore(tmp_path)
    assert all(isinstance(v, dict) and "media_ref" in v for v in values)
    assert stats.media_refused == 2 and stats.media_restored == 0


def test_restore_verifies_the_hash_and_the_size_of_what_it_read(tmp_path: Path) -> None:
    good = blob(3000, 7)
    digest = hashlib.sha256(good).hexdigest()
    name = f"media/{digest[:2]}/{digest}.bin"
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_bytes(good)
    altered = bytearray(good)
    altered[100] ^= 1
    other = hashlib.sha256(b"other").hexdigest()
    other_name = f"media/{other[:2]}/{other}.bin"
    (tmp_path / other_name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / other_name).write_bytes(bytes(altered))  # same size, not the content hashed
    write_record(
        tmp_path,
        planted(digest, name, size=len(good)),  # the original: restored
        planted(other, other_name, size=len(good)),  # content does not match its hash
        planted(digest, name, size=len(good) - 1),  # hash matches, recorded size does not
    )
    values, stats = restore(tmp_path)
    assert values[0] == b64(good)
    assert "media_ref" in values[1] and "media_ref" in values[2]
    assert stats.media_restored == 1 and stats.media_missing == 2 and stats.media_refused == 0


@pytest.mark.parametrize(
    "mime", ["image/../../x", "image/x;y", "IMAGE/PNG/../..", "a/" + "b" * 200]
)
async def test_a_strange_media_type_gets_an_extension_from_the_allow_list(
    fake_vllm: FakeVLLMServer, tmp_path: Path, mime: str
) -> None:
    part = {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(IMAGE)}"}}
    async with client_for(fake_vllm, tmp_path) as client:
        await client.chat_completion([{"role": "user", "content": [part]}], model=MODEL)
    (stored,) = media_files(tmp_path)
    digest = hashlib.sha256(IMAGE).hexdigest()
    assert stored == tmp_path / "media" / digest[:2] / f"{digest}.bin"
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "media" not in p.parts] == [
        p for p in tmp_path.rglob("*.jsonl")
    ]
    (record,) = load_logs(tmp_path, restore_media=True)
    assert record["messages"][0]["content"][0] == part
