"""The request path's shortcuts: the record they build and the media walk they skip."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from vllm_middleware import VLLMMiddleware, load_logs
from vllm_middleware._media import MediaPipeline

from .test_media import blob

MODEL = "vllm:qwen-2.5-omni-7b"
# media_min_bytes=300: a blob is moved from 400 base64 characters on (ceil(300 * 4 / 3)).
MIN_BYTES = 300
MIN_CHARS = 400
FIELDS = [
    "timestamp",
    "request_id",
    "model",
    "messages",
    "response",
    "parameters",
    "latency_ms",
    "error",
    "metadata",
    "schema_version",
    "host",
    "endpoint",
    "status_code",
    "usage",
    "stream",
    "ttft_ms",
]


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


def reply(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def mock_client(tmp_path: Path, answer: dict[str, Any], **kwargs: Any) -> VLLMMiddleware:
    body = orjson.dumps(answer)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x/v1")
    return VLLMMiddleware(
        "http://x/v1", log_dir=tmp_path, redis_url="", http_client=http, host="h1", **kwargs
    )


async def finish(client: VLLMMiddleware) -> None:
    await client.close()
    await client._http.aclose()


def count_walks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Record the (messages, response) flags of every `MediaPipeline.prepare` call."""
    calls: list[tuple[bool, bool]] = []
    original = MediaPipeline.prepare

    def spy(
        self: MediaPipeline, record: dict[str, Any], *, messages: bool = True, response: bool = True
    ) -> Any:
        calls.append((messages, response))
        return original(self, record, messages=messages, response=response)

    monkeypatch.setattr(MediaPipeline, "prepare", spy)
    return calls


async def test_record_fields_order_and_values(tmp_path: Path) -> None:
    answer = reply({"role": "assistant", "content": "Paris"})
    client = mock_client(tmp_path, answer, metadata={"team": "a"})
    messages = [{"role": "user", "content": "Capital of France?"}]
    result = await client.chat_completion(
        messages, model=MODEL, temperature=0.5, metadata={"run": 1}, headers={"X-Request-Id": "c1"}
    )
    await finish(client)
    assert result == answer
    (record,) = load_logs(tmp_path)
    data = record.to_dict()
    assert list(data) == [*FIELDS, "client_request_id"]
    assert data["model"] == MODEL and data["messages"] == messages and data["response"] == answer
    assert data["parameters"] == {"temperature": 0.5}
    assert data["error"] is None and data["ttft_ms"] is None and data["stream"] is False
    assert data["metadata"] == {"team": "a", "run": 1}
    assert data["schema_version"] == 2 and data["host"] == "h1"
    assert data["endpoint"] == "chat/completions" and data["status_code"] == 200
    assert data["usage"] == answer["usage"] and data["client_request_id"] == "c1"
    assert isinstance(data["latency_ms"], float) and data["request_id"].startswith("req_")


async def test_completions_and_error_records_keep_their_fields(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if orjson.loads(request.content)["prompt"] == "bad":
            return httpx.Response(400, json={"error": {"message": "nope"}})
        return httpx.Response(200, json={"choices": [{"text": "ok"}], "model": MODEL})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x/v1")
    client = VLLMMiddleware("http://x/v1", log_dir=tmp_path, redis_url="", http_client=http)
    await client.completions("hi", max_tokens=3)
    with pytest.raises(Exception, match="nope"):
        await client.completions("bad")
    await finish(client)
    ok, failed = sorted(load_logs(tmp_path), key=lambda r: r.error is not None)
    prompt_fields = [f.replace("messages", "prompt") for f in FIELDS]
    assert list(ok) == prompt_fields
    assert ok.prompt == "hi" and ok.model == MODEL and ok.error is None
    assert ok.endpoint == "completions" and ok.parameters == {"max_tokens": 3}
    assert list(failed) == [*prompt_fields, "error_detail"]
    assert "nope" in failed.error and failed.status_code == 400 and failed.response is None


async def test_text_chat_skips_the_media_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks = count_walks(monkeypatch)
    answer = reply({"role": "assistant", "content": "hi"})
    client = mock_client(tmp_path, answer, media_min_bytes=MIN_BYTES)
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    await client.chat_completion(messages, model=MODEL)
    await finish(client)
    assert walks == []  # request and reply both shorter than one blob
    (record,) = load_logs(tmp_path)
    assert record.messages == messages and record.response == answer


async def test_long_text_chat_is_still_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks = count_walks(monkeypatch)
    client = mock_client(
        tmp_path,
        reply({"role": "assistant", "content": "x" * MIN_CHARS}),
        media_min_bytes=MIN_BYTES,
    )
    await client.chat_completion([{"role": "user", "content": "y" * MIN_CHARS}], model=MODEL)
    await finish(client)
    assert walks == [(True, True)]


async def test_smallest_blobs_in_request_and_reply_are_still_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blobs of exactly the threshold: the shortcut must walk these (their JSON is barely
    # longer than the blob), or they would stay inline.
    walks = count_walks(monkeypatch)
    sent, spoken = blob(MIN_BYTES, 1), blob(MIN_BYTES, 2)
    sent_text, spoken_text = base64.b64encode(sent).decode(), base64.b64encode(spoken).decode()
    assert len(sent_text) == len(spoken_text) == MIN_CHARS
    audio = {"id": "audio-1", "data": spoken_text, "expires_at": 2, "transcript": "hi"}
    answer = reply({"role": "assistant", "content": None, "audio": audio})
    client = mock_client(tmp_path, answer, media_min_bytes=MIN_BYTES)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": sent_text, "format": "wav"}}
            ],
        }
    ]
    result = await client.chat_completion(messages, model=MODEL)
    await finish(client)
    stats = client.get_statistics()["client"]
    assert result == answer
    assert walks == [(True, True)]
    assert stats["media_stored"] == 2
    (record,) = load_logs(tmp_path)
    sent_ref = record.messages[0]["content"][0]["input_audio"]["data"]["media_ref"]
    spoken_ref = record.response["choices"][0]["message"]["audio"]["data"]["media_ref"]
    assert (tmp_path / sent_ref["path"]).read_bytes() == sent
    assert (tmp_path / spoken_ref["path"]).read_bytes() == spoken
    (restored,) = load_logs(tmp_path, restore_media=True)
    assert restored.messages == messages and restored.response == answer


async def test_blob_in_the_reply_only_walks_the_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks = count_walks(monkeypatch)
    spoken = blob(MIN_BYTES, 3)
    audio = {"id": "audio-1", "data": base64.b64encode(spoken).decode(), "format": "wav"}
    answer = reply({"role": "assistant", "content": None, "audio": audio})
    client = mock_client(tmp_path, answer, media_min_bytes=MIN_BYTES)
    await client.chat_completion([{"role": "user", "content": "speak"}], model=MODEL)
    await finish(client)
    assert walks == [(False, True)]
    (record,) = load_logs(tmp_path)
    ref = record.response["choices"][0]["message"]["audio"]["data"]["media_ref"]
    assert (tmp_path / ref["path"]).read_bytes() == spoken


@pytest.mark.parametrize("size", [MIN_CHARS - 1, MIN_CHARS])
def test_a_blob_is_never_shorter_than_min_chars(tmp_path: Path, size: int) -> None:
    # The bound the shortcut relies on: a string the walk moves has at least `min_chars`
    # characters, so JSON holding it has at least as many bytes.
    pipeline = MediaPipeline(
        "drop",
        tmp_path,
        tmp_path / "media",
        min_bytes=MIN_BYTES,
        max_record_bytes=1 << 20,
        fsync=False,
    )
    assert pipeline.min_chars == MIN_CHARS
    url = "data:image/png;base64,"
    url += "A" * (size - len(url))
    text = "A" * size
    parts = [{"image_url": {"url": url}}, {"input_audio": {"data": text}}, {"image_embeds": text}]
    for part in parts:
        messages = [{"role": "user", "content": [part]}]
        job = pipeline.prepare({"messages": messages})
        assert (job is not None) == (size >= MIN_CHARS), part
