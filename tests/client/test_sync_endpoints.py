"""SyncVLLMMiddleware's other endpoints (embeddings, responses, rerank, score, tokenize,
detokenize, audio transcriptions, the generic request) against the real fake vLLM server: the
answers, the records (the async client's, for the same traffic), a thread pool sharing one
client, Redis and embedded modes, and the ways a call fails."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from vllm_middleware import (
    APIConnectionError,
    APIError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    Stream,
    SyncVLLMMiddleware,
    VLLMMiddleware,
    load_logs,
)
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess
from vllm_middleware_testing._fake_endpoints import embedding

AUDIO = b"RIFF" + bytes(range(256)) * 40  # a 10 KB "wav": over media_min_bytes


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


@pytest.fixture
def server() -> Iterator[FakeVLLMServer]:
    # Per test: the fake's tokenizer numbers words in the order it first sees them.
    with FakeVLLMServer() as fake:
        yield fake


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def one_record(log_dir: Path, endpoint: str) -> dict[str, Any]:
    records = [r.to_dict() for r in load_logs(log_dir) if r["endpoint"] == endpoint]
    assert len(records) == 1, records
    return records[0]


def response_text(answer: dict[str, Any]) -> str:
    return str(answer["output"][0]["content"][0]["text"])


# -- every endpoint ---------------------------------------------------------------------------
def test_every_endpoint_answers_and_records(server: FakeVLLMServer, tmp_path: Path) -> None:
    with SyncVLLMMiddleware(server.base_url, log_dir=tmp_path) as client:
        vectors = client.embeddings(["hello world", "bye"], model=server.model, dimensions=8)
        ranked = client.rerank("capital of France", ["Paris", "Berlin", "Rome"], top_n=2)
        scored = client.score("capital of France", ["Paris", "Berlin"])
        tokens = client.tokenize("one two three", return_token_strs=True)
        text = client.detokenize(tokens["tokens"])
        version = client.request("GET", "/version")
        plain = client.responses("Hello there", instructions="Be brief.")
        heard = client.audio.transcriptions(("clip.wav", AUDIO), model=server.model, language="en")
    assert vectors["data"][0]["embedding"] == embedding("hello world", 8)
    assert len(ranked["results"]) == 2
    assert [d["index"] for d in scored["data"]] == [0, 1]
    assert tokens["token_strs"] == ["one", " two", " three"] and text == {"prompt": "one two three"}
    assert version == {"version": "0.33.0"}
    assert response_text(plain) == "Echo: Hello there"
    assert heard["text"] == f"Fake transcript of {len(AUDIO)} bytes of audio."

    record = one_record(tmp_path, "embeddings")
    assert record["input"] == ["hello world", "bye"] and record["parameters"] == {"dimensions": 8}
    packed = struct.pack("<8f", *vectors["data"][0]["embedding"])
    summary = {"dimensions": 8, "sha256": hashlib.sha256(packed).hexdigest()}
    assert record["response"]["data"][0]["embedding"] == summary
    assert one_record(tmp_path, "rerank")["response"] == ranked
    assert one_record(tmp_path, "score")["usage"] == scored["usage"]
    assert one_record(tmp_path, "tokenize")["prompt"] == "one two three"
    assert one_record(tmp_path, "detokenize")["input"] == tokens["tokens"]
    assert one_record(tmp_path, "version")["response"] == version
    assert one_record(tmp_path, "responses")["response"] == plain
    audio = one_record(tmp_path, "audio/transcriptions")
    assert "media_ref" in str(audio["messages"]) and audio["parameters"] == {"language": "en"}
    restored = load_logs(tmp_path, restore_media=True)
    (heard_record,) = [r for r in restored if r["endpoint"] == "audio/transcriptions"]
    data = heard_record["messages"][0]["content"][0]["input_audio"]["data"]
    assert base64.b64decode(data) == AUDIO
    paths = [r.path for r in server.requests]
    assert paths[3:6] == ["/tokenize", "/detokenize", "/version"]  # at the server root


def test_embeddings_stored_per_call_and_per_client(server: FakeVLLMServer, tmp_path: Path) -> None:
    with SyncVLLMMiddleware(server.base_url, log_dir=tmp_path) as client:
        kept = client.embeddings("a", store_embeddings=True, metadata={"n": 1})
        client.store_embeddings = True
        also = client.embeddings("b", metadata={"n": 2})
        hashed = client.embeddings("c", store_embeddings=False, metadata={"n": 3})
    by_n = {r["metadata"]["n"]: r for r in load_logs(tmp_path)}
    assert by_n[1]["response"]["data"] == kept["data"]
    assert by_n[2]["response"]["data"] == also["data"]
    assert set(by_n[3]["response"]["data"][0]["embedding"]) == {"dimensions", "sha256"}
    assert hashed["data"][0]["embedding"] == embedding("c")  # the caller gets the vector


def test_a_responses_stream_is_a_sync_iterator_with_one_record(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    with SyncVLLMMiddleware(server.base_url, log_dir=tmp_path) as client:
        plain = client.responses("Stream this one please")
        stream = client.responses("Stream this one please", stream=True)
        assert isinstance(stream, Stream)
        with stream:
            events = list(stream)
        assert stream.closed
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == response_text(plain)
    (record,) = [r for r in load_logs(tmp_path) if r["stream"]]
    assert record["stream_end"] == "completed" and record["chunks"] == len(events)
    assert record["response"]["output"][0]["content"] == plain["output"][0]["content"]
    assert record["usage"] == plain["usage"] and record["ttft_ms"] is not None
    assert server.requests[-1].body["stream"] is True


def test_a_responses_stream_ends_however_the_caller_leaves_it(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    words = "one two three four five six seven eight"
    with SyncVLLMMiddleware(server.base_url, log_dir=tmp_path) as client:
        with client.responses(words, metadata={"how": "closed"}, stream=True) as stream:
            for event in stream:
                if event["type"] == "response.output_text.delta":
                    break
        dropped = client.responses(words, metadata={"how": "dropped"}, stream=True)
        next(dropped)
        del dropped
        gc.collect()
        cut = client.responses(f"{words} [[drop]]", metadata={"how": "cut"}, stream=True)
        got = []
        with pytest.raises(APIConnectionError), cut:
            for event in cut:
                got.append(event)
        # A stream that kept its connection would make this call wait for the pool.
        assert response_text(client.responses("after", metadata={"how": "after"})) == "Echo: after"
    ends = {r["metadata"]["how"]: r for r in load_logs(tmp_path)}
    assert len(ends) == 4 and ends["after"]["stream"] is False
    assert ends["closed"]["stream_end"] == "abandoned"
    assert ends["dropped"]["stream_end"] == "abandoned"
    assert "garbage-collected" in str(ends["dropped"]["error"])
    assert ends["cut"]["stream_end"] == "disconnected"
    text = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
    assert text and ends["cut"]["response"]["status"] == "incomplete"
    assert ends["cut"]["response"]["output"][0]["content"][0]["text"] == text


# -- errors -----------------------------------------------------------------------------------
def test_http_errors_are_raised_typed_and_recorded(server: FakeVLLMServer, tmp_path: Path) -> None:
    with SyncVLLMMiddleware(server.base_url, log_dir=tmp_path) as client:
        with pytest.raises(NotFoundError):
            client.embeddings("x", model="no-such-model")
        with pytest.raises(NotFoundError):
            client.request("POST", "nope", json={"a": 1})
        with pytest.raises(ServiceUnavailableError):
            client.responses("[[status:503]]")
        with pytest.raises(ServiceUnavailableError):
            client.responses("[[status:503]]", stream=True)
        with pytest.raises(InvalidRequestError):
            client.rerank("q", [object()])  # not JSON: never sent
    records = {(r["endpoint"], r["stream"]): r for r in load_logs(tmp_path)}
    assert len(records) == 5 and all(r["error"] for r in records.values())
    assert records["embeddings", False]["status_code"] == 404
    assert records["nope", False]["status_code"] == 404
    assert records["responses", False]["status_code"] == 503
    assert records["responses", True]["stream_end"] == "http_error"
    assert records["rerank", False]["status_code"] is None


def test_a_refused_connection_is_raised_and_recorded(tmp_path: Path) -> None:
    with SyncVLLMMiddleware(closed_url(), log_dir=tmp_path) as client:
        with pytest.raises(APIConnectionError):
            client.embeddings("x")
        with pytest.raises(APIConnectionError):
            client.responses("x", stream=True)
        with pytest.raises(APIConnectionError):
            client.audio.transcriptions(b"\x00" * 64)
        with pytest.raises(APIConnectionError):
            client.models()
        assert client.health() is False
    records = load_logs(tmp_path)
    assert sorted(r["endpoint"] for r in records) == [
        "audio/transcriptions",
        "embeddings",
        "responses",
    ]
    assert all("connection failed" in str(r.error) for r in records)
    assert [r["stream_end"] for r in records if r["stream"]] == ["disconnected"]


def test_durable_calls_return_once_the_record_is_on_disk(
    server: FakeVLLMServer, tmp_path: Path
) -> None:
    with SyncVLLMMiddleware(
        server.base_url, log_dir=tmp_path, flush_interval=60, durable=True
    ) as client:
        client.embeddings("x")
        assert len(load_logs(tmp_path)) == 1
        with pytest.raises(NotFoundError):
            client.request("GET", "missing")
        assert len(load_logs(tmp_path)) == 2


# -- threads and Redis ------------------------------------------------------------------------
def _one_of_each(client: SyncVLLMMiddleware, i: int) -> str:
    """A call of kind i % 6; what the server answered, in a form that says which call it was."""
    word = f"w{i}"
    kind = i % 6
    if kind == 0:
        return str(client.embeddings(word)["data"][0]["embedding"] == embedding(word))
    if kind == 1:
        return response_text(client.responses(word))
    if kind == 2:
        with client.responses(word, stream=True) as stream:
            return "".join(e.get("delta", "") for e in stream if e["type"].endswith(".delta"))
    if kind == 3:
        return str(client.tokenize(f"{word} {word}")["count"])
    if kind == 4:
        return str(client.rerank(word, [word, "other"])["results"][0]["index"])
    scored = client.request("POST", "score", json={"queries": word, "documents": [word, "x"]})
    return str(len(scored["data"]))


def _expected(i: int) -> str:
    word = f"w{i}"
    return ["True", f"Echo: {word}", f"Echo: {word}", "2", "0", "2"][i % 6]


def test_one_client_shared_by_a_thread_pool(server: FakeVLLMServer, tmp_path: Path) -> None:
    calls = 96
    with (
        SyncVLLMMiddleware(server.base_url, log_dir=tmp_path) as client,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        answers = list(pool.map(lambda i: _one_of_each(client, i), range(calls)))
        assert client.total_requests == calls
    assert answers == [_expected(i) for i in range(calls)]  # each thread got its own answer
    records = load_logs(tmp_path)
    assert len(records) == calls and len({r.request_id for r in records}) == calls
    assert all(r.error is None for r in records)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["endpoint"]] = counts.get(record["endpoint"], 0) + 1
    assert counts == {"embeddings": 16, "responses": 32, "tokenize": 16, "rerank": 16, "score": 16}


def test_records_ship_to_redis_from_a_thread_pool(
    server: FakeVLLMServer, redis_server: RedisServerProcess
) -> None:
    with (
        SyncVLLMMiddleware(server.base_url, redis_url=redis_server.url, stream="e:logs") as c,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        assert c.mode == "redis"
        list(pool.map(lambda i: _one_of_each(c, i), range(36)))
    shipped = c.recorder.local_statistics()
    assert shipped["submitted"] == shipped["shipped"] == 36  # in Redis once close() returned
    with redis.Redis.from_url(redis_server.url) as r:
        assert r.xlen("e:logs") >= 1  # (records travel in bundles)


# -- the async client's records for the same traffic ------------------------------------------
WORDS = "one two three four five six seven eight"
# (case, base URL key, method path, args, keyword arguments, how a stream is read)
TRAFFIC: list[tuple[str, str, str, tuple[Any, ...], dict[str, Any], str]] = [
    ("embeddings", "fake", "embeddings", (["a", "b"],), {"dimensions": 4}, ""),
    ("embeddings-b64", "fake", "embeddings", ("a",), {"encoding_format": "base64"}, ""),
    ("embeddings-kept", "fake", "embeddings", ("a",), {"store_embeddings": True}, ""),
    ("embeddings-404", "fake", "embeddings", ("a",), {"model": "no-such-model"}, ""),
    ("rerank", "fake", "rerank", ("q", ["q", "x", "y"]), {"top_n": 2}, ""),
    ("score", "fake", "score", ("q", ["q", "x"]), {}, ""),
    ("tokenize", "fake", "tokenize", ("one two",), {"return_token_strs": True}, ""),
    (
        "tokenize-chat",
        "fake",
        "tokenize",
        (),
        {"messages": [{"role": "user", "content": "hi"}]},
        "",
    ),
    ("detokenize", "fake", "detokenize", ([0, 1],), {}, ""),
    ("request-get", "fake", "request", ("GET", "/version"), {}, ""),
    ("request-post", "fake", "request", ("POST", "embeddings"), {"json": {"input": "x"}}, ""),
    ("request-404", "fake", "request", ("POST", "nope"), {"json": {"a": 1}}, ""),
    ("responses", "fake", "responses", ("Say hi",), {"max_output_tokens": 5}, ""),
    ("responses-503", "fake", "responses", ("[[status:503]]",), {}, ""),
    ("responses-stream", "fake", "responses", (WORDS,), {"instructions": "Be brief."}, "all"),
    ("responses-closed", "fake", "responses", (WORDS,), {}, "first"),
    ("responses-cut", "fake", "responses", (f"{WORDS} [[drop]]",), {}, "all"),
    ("responses-stream-503", "fake", "responses", ("[[status:503]]",), {}, "all"),
    ("audio", "fake", "audio.transcriptions", (("clip.wav", AUDIO),), {"language": "en"}, ""),
    ("refused", "closed", "embeddings", ("a",), {}, ""),
    ("refused-stream", "closed", "responses", ("a",), {}, "all"),
    ("not-json", "fake", "rerank", ("q", [object()]), {}, ""),
]

_VOLATILE = {"timestamp", "request_id", "latency_ms", "ttft_ms", "id", "created", "created_at"}
_GENERATED = ("resp_", "msg_", "embd-", "score-", "rerank-")


def normalized(value: Any, key: str | None = None) -> Any:
    """A record's value with what differs between two runs of the same call replaced: ids,
    times, the ids the server generates, and the wording of a refused connection (httpx's
    sync and async transports word it differently)."""
    if isinstance(value, dict):
        return {k: normalized(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if key in _VOLATILE and value is not None:
        return f"<{key}>"
    if isinstance(value, str) and value.startswith(_GENERATED):
        return "<generated id>"
    if key in ("error", "message") and isinstance(value, str) and "connection failed" in value:
        return value.rsplit(": ", 1)[0]
    return value


def raw_lines(log_dir: Path) -> list[str]:
    """The record lines as written (the media stay references)."""
    return [
        line
        for path in sorted(log_dir.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line
    ]


def _target(clients: dict[str, Any], where: str, path: str) -> Any:
    target = clients[where]
    for name in path.split("."):
        target = getattr(target, name)
    return target


def _kwargs(case: str, method: str, model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    if method != "request":
        kwargs = {"model": model, **kwargs}
    return {**kwargs, "metadata": {"case": case}}


def run_sync(urls: dict[str, str], log_dir: Path, model: str) -> dict[str, tuple[str, int]]:
    clients = {
        key: SyncVLLMMiddleware(url, log_dir=log_dir, host="same") for key, url in urls.items()
    }
    seen: dict[str, tuple[str, int]] = {}
    for case, where, method, args, kwargs, reading in TRAFFIC:
        call = _target(clients, where, method)
        events = 0
        try:
            if not reading:
                call(*args, **_kwargs(case, method, model, kwargs))
            else:
                with call(*args, stream=True, **_kwargs(case, method, model, kwargs)) as stream:
                    for _ in stream:
                        events += 1
                        if reading == "first":
                            break
        except (APIError, InvalidRequestError) as exc:
            seen[case] = (type(exc).__name__, events)
        else:
            seen[case] = ("ok", events)
    for client in clients.values():
        client.close()
    return seen


async def run_async(urls: dict[str, str], log_dir: Path, model: str) -> dict[str, tuple[str, int]]:
    """`run_sync` through VLLMMiddleware."""
    clients = {key: VLLMMiddleware(url, log_dir=log_dir, host="same") for key, url in urls.items()}
    seen: dict[str, tuple[str, int]] = {}
    for case, where, method, args, kwargs, reading in TRAFFIC:
        call = _target(clients, where, method)
        events = 0
        try:
            if not reading:
                await call(*args, **_kwargs(case, method, model, kwargs))
            else:
                stream = await call(*args, stream=True, **_kwargs(case, method, model, kwargs))
                async with stream:
                    async for _ in stream:
                        events += 1
                        if reading == "first":
                            break
        except (APIError, InvalidRequestError) as exc:
            seen[case] = (type(exc).__name__, events)
        else:
            seen[case] = ("ok", events)
    for client in clients.values():
        await client.close()
    return seen


def test_records_equal_the_async_clients_for_the_same_traffic(tmp_path: Path) -> None:
    closed = closed_url()
    # A fresh server for each client: the fake's tokenizer numbers words as it meets them.
    fakes = {}
    with FakeVLLMServer() as fake:
        fakes["async"] = fake.base_url
        urls = {"fake": fake.base_url, "closed": closed}
        seen_async = asyncio.run(run_async(urls, tmp_path / "async", fake.model))
    with FakeVLLMServer() as fake:
        fakes["sync"] = fake.base_url
        urls = {"fake": fake.base_url, "closed": closed}
        seen_sync = run_sync(urls, tmp_path / "sync", fake.model)
    assert seen_sync == seen_async  # the same answers and exceptions reached the caller
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    for side in ("async", "sync"):
        # (The two servers' addresses differ: an error naming one names it as "<fake>".)
        lines = [line.replace(fakes[side], "<fake>") for line in raw_lines(tmp_path / side)]
        records = [json.loads(line) for line in lines]
        cases[side] = {record["metadata"]["case"]: record for record in records}
        assert len(cases[side]) == len(records) == len(TRAFFIC)
    for case, expected in cases["async"].items():
        got = cases["sync"][case]
        # The same fields in the same order (nested too), with the same values.
        assert json.dumps(normalized(got)) == json.dumps(normalized(expected)), case
    ends = {record.get("stream_end") for record in cases["sync"].values()}
    assert ends == {None, "completed", "abandoned", "disconnected", "http_error"}
