"""vLLM's other endpoints through the middleware and the real fake server: each call answers
what the server sent and leaves one record with the chat record's fields."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from vllm_middleware import APIConnectionError, NotFoundError, VLLMMiddleware, load_logs
from vllm_middleware_testing import FakeVLLMServer
from vllm_middleware_testing._fake_endpoints import embedding

RECORD_FIELDS = {
    "timestamp",
    "request_id",
    "model",
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
}


@pytest.fixture
def server() -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer() as fake:
        yield fake


def one_record(tmp_path: Path, endpoint: str) -> dict[str, Any]:
    records = [r.to_dict() for r in load_logs(tmp_path) if r["endpoint"] == endpoint]
    assert len(records) == 1, records
    record = records[0]
    assert set(record) >= RECORD_FIELDS
    return record


async def test_embeddings_keep_size_and_hash_by_default(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    answer = await client.embeddings(["hello world", "bye"], model=server.model, dimensions=8)
    await client.close()
    vectors = [item["embedding"] for item in answer["data"]]
    assert vectors[0] == embedding("hello world", 8) and len(vectors[1]) == 8
    record = one_record(tmp_path, "embeddings")
    assert record["input"] == ["hello world", "bye"]
    assert record["parameters"] == {"dimensions": 8}
    assert record["usage"] == answer["usage"] and record["status_code"] == 200
    stored = [item["embedding"] for item in record["response"]["data"]]
    packed = struct.pack("<8f", *vectors[0])
    assert stored[0] == {"dimensions": 8, "sha256": hashlib.sha256(packed).hexdigest()}
    sent = server.requests[-1].body
    assert sent == {"input": ["hello world", "bye"], "dimensions": 8, "model": server.model}


async def test_embeddings_stored_on_request_and_base64_hashed_alike(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    floats = await client.embeddings("same text", store_embeddings=True)
    as_b64 = await client.embeddings("same text", encoding_format="base64")
    await client.close()
    records = sorted(load_logs(tmp_path), key=lambda r: r["timestamp"])
    kept = next(r for r in records if "encoding_format" not in r["parameters"])
    assert kept["response"]["data"] == floats["data"]
    hashed = next(r for r in records if "encoding_format" in r["parameters"])
    raw = base64.b64decode(as_b64["data"][0]["embedding"])
    summary = hashed["response"]["data"][0]["embedding"]
    assert summary == {"dimensions": 16, "sha256": hashlib.sha256(raw).hexdigest()}
    vector = floats["data"][0]["embedding"]
    assert summary["sha256"] == hashlib.sha256(struct.pack("<16f", *vector)).hexdigest()


async def test_rerank_and_score(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    ranked = await client.rerank("capital of France", ["Paris", "Berlin", "Rome"], top_n=2)
    scored = await client.score("capital of France", ["Paris", "Berlin"])
    await client.close()
    assert len(ranked["results"]) == 2
    scores = [r["relevance_score"] for r in ranked["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [d["index"] for d in scored["data"]] == [0, 1]
    rerank = one_record(tmp_path, "rerank")
    assert rerank["input"] == {
        "query": "capital of France",
        "documents": ["Paris", "Berlin", "Rome"],
    }
    assert rerank["parameters"] == {"top_n": 2} and rerank["response"] == ranked
    score = one_record(tmp_path, "score")
    assert score["response"] == scored and score["usage"] == scored["usage"]


async def test_tokenize_and_detokenize_at_the_server_root(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    tokens = await client.tokenize("one two three", return_token_strs=True)
    text = await client.detokenize(tokens["tokens"])
    chat = await client.tokenize(messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert tokens["count"] == 3 and tokens["token_strs"] == ["one", " two", " three"]
    assert text == {"prompt": "one two three"}
    assert chat["count"] >= 1
    assert [r.path for r in server.requests] == ["/tokenize", "/detokenize", "/tokenize"]
    records = [r for r in load_logs(tmp_path) if r["endpoint"] == "tokenize"]
    assert sorted("prompt" in r for r in records) == [False, True]
    assert any(r.get("messages") == [{"role": "user", "content": "hi"}] for r in records)
    assert one_record(tmp_path, "detokenize")["input"] == tokens["tokens"]


async def test_generic_request_any_path_and_errors(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    version = await client.request("GET", "/version")
    models = await client.request("GET", "models")
    embedded = await client.request("POST", "embeddings", json={"input": "x"})
    with pytest.raises(NotFoundError):
        await client.request("POST", "nope", json={"a": 1})
    await client.close()
    assert version == {"version": "0.33.0"} and models["data"][0]["id"] == server.model
    assert embedded["data"][0]["embedding"] == embedding("x")
    assert one_record(tmp_path, "version")["response"] == version
    generic = one_record(tmp_path, "embeddings")
    assert generic["input"] == {"input": "x"}
    assert generic["response"] == embedded  # the generic path keeps the answer as it came
    failed = one_record(tmp_path, "nope")
    assert failed["status_code"] == 404 and failed["error"] is not None


async def test_responses_plain(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    answer = await client.responses("Hello there", instructions="Be brief.")
    await client.close()
    text = answer["output"][0]["content"][0]["text"]
    assert text == "Echo: Hello there" and answer["status"] == "completed"
    record = one_record(tmp_path, "responses")
    assert record["input"] == "Hello there"
    assert record["parameters"] == {"instructions": "Be brief."}
    assert record["response"] == answer and record["usage"] == answer["usage"]


async def test_responses_stream_reassembled(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    plain = await client.responses("Stream this one please")
    stream = await client.responses("Stream this one please", stream=True)
    async with stream:
        events = [event async for event in stream]
    await client.close()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == plain["output"][0]["content"][0]["text"]
    record = next(r for r in load_logs(tmp_path) if r["stream"])
    assert record["endpoint"] == "responses" and record["stream_end"] == "completed"
    assert record["chunks"] == len(events) and record["ttft_ms"] is not None
    response = record["response"]
    assert response["output"][0]["content"] == plain["output"][0]["content"]
    assert response["usage"] == plain["usage"] == record["usage"]
    sent = server.requests[-1].body
    assert sent["stream"] is True and sent["input"] == "Stream this one please"


async def test_responses_stream_cut_keeps_what_arrived(tmp_path: Path) -> None:
    with FakeVLLMServer() as server:
        client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
        stream = await client.responses("one two three four five [[drop]]", stream=True)
        got = []
        with pytest.raises(APIConnectionError):
            async for event in stream:
                got.append(event)
        await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "disconnected"
    text = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
    assert text and record["response"]["status"] == "incomplete"
    assert record["response"]["output"][0]["content"][0]["text"] == text


async def test_audio_transcription_goes_to_the_media_store(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    audio = b"RIFF" + bytes(range(256)) * 40  # a 10 KB "wav"
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    answer = await client.audio.transcriptions(
        ("clip.wav", audio), model=server.model, language="en"
    )
    await client.close()
    assert answer["text"] == f"Fake transcript of {len(audio)} bytes of audio."
    sent = server.requests[-1]
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    record = one_record(tmp_path, "audio/transcriptions")
    assert record["parameters"] == {"language": "en"} and record["response"] == answer
    part = record["messages"][0]["content"][0]["input_audio"]
    assert part["format"] == "wav" and "media_ref" in str(part)
    (restored,) = load_logs(tmp_path, restore_media=True)
    data = restored["messages"][0]["content"][0]["input_audio"]["data"]
    assert base64.b64decode(data) == audio


async def test_injected_json_client_still_sends_multipart(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    http = httpx.AsyncClient(base_url=server.base_url, headers={"content-type": "application/json"})
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="", http_client=http)
    answer = await client.audio.transcriptions(b"\x00" * 64)
    await client.close()
    await http.aclose()
    assert answer["usage"] == {"type": "duration", "seconds": 1}
