"""SyncVLLMMiddleware against the real fake vLLM server: the async client's records for the same
traffic, shared by the threads of a pool, streams however they end, close and drop."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import inspect
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from vllm_middleware import (
    APIConnectionError,
    APIError,
    APIStatusError,
    BadRequestError,
    ServiceUnavailableError,
    Stream,
    SyncVLLMMiddleware,
    VLLMMiddleware,
    load_logs,
)
from vllm_middleware._endpoints import AsyncAudio
from vllm_middleware._sync_endpoints import SyncAudio
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

from .test_client import closed_port

MODEL = "vllm:qwen-2.5-omni-7b"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


class _Garbage(BaseHTTPRequestHandler):
    """Answers every POST with 200 and a body that is not JSON (a misconfigured proxy)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b"<html>not json</html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


@pytest.fixture
def garbage_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


# -- the same traffic through both clients ---------------------------------------------------
# (case, base URL key, method, payload, keyword arguments, how a stream is read)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
TRAFFIC: list[tuple[str, str, str, Any, dict[str, Any], str]] = [
    ("chat", "fake", "chat_completion", HELLO, {"temperature": 0.0, "max_tokens": 8}, ""),
    ("completion", "fake", "completions", "Once upon", {"headers": {"X-Request-Id": "c-2"}}, ""),
    ("tools", "fake", "chat_completion", HELLO, {"tools": TOOLS, "tool_choice": "required"}, ""),
    ("chat-stream", "fake", "chat_completion", HELLO, {"max_tokens": 6}, "all"),
    ("completion-stream", "fake", "completions", "Count:", {"max_tokens": 4}, "all"),
    (
        "usage-stream",
        "fake",
        "chat_completion",
        HELLO,
        {"stream_options": {"include_usage": True}},
        "all",
    ),
    ("closed-stream", "fake", "chat_completion", HELLO, {}, "first"),
    (
        "error-event",
        "fake",
        "chat_completion",
        [{"role": "user", "content": "one two three [[midstream_error]]"}],
        {},
        "all",
    ),
    (
        "dropped",
        "fake",
        "chat_completion",
        [{"role": "user", "content": "one two three [[drop]]"}],
        {},
        "all",
    ),
    (
        "status-503",
        "fake",
        "chat_completion",
        [{"role": "user", "content": "[[status:503]]"}],
        {},
        "",
    ),
    ("status-400", "fake", "completions", "[[status:400]]", {}, ""),
    ("status-404", "fake", "chat_completion", HELLO, {"model": "no-such-model"}, ""),
    (
        "stream-503",
        "fake",
        "chat_completion",
        [{"role": "user", "content": "[[status:503]]"}],
        {},
        "all",
    ),
    ("bad-params", "fake", "chat_completion", HELLO, {"max_tokens": -1}, ""),
    ("refused", "closed", "chat_completion", HELLO, {}, ""),
    ("refused-stream", "closed", "completions", "x", {}, "all"),
    ("not-json", "garbage", "completions", "x", {}, ""),
    ("not-json-stream", "garbage", "chat_completion", HELLO, {}, "all"),
]

_VOLATILE = {"timestamp", "request_id", "latency_ms", "ttft_ms", "id", "created"}


def normalized(value: Any, key: str | None = None) -> Any:
    """A record's value with what differs between two runs of the same call replaced: ids,
    times, and the ids the server generates."""
    if isinstance(value, dict):
        return {k: normalized(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if key in _VOLATILE and value is not None:
        return f"<{key}>"
    if isinstance(value, str) and value.startswith(("chatcmpl-", "cmpl-")):
        return "<generated id>"
    return value


def transport_text_cut(record: dict[str, Any]) -> dict[str, Any]:
    """A connection failure's record without the wording of the failure itself, which comes
    from httpx's transport and differs between its sync and async ones ("[Errno 111]
    Connection refused" / "All connection attempts failed"); the rest must be equal."""
    if record.get("error_detail", {}).get("kind") != "APIConnectionError":
        return record
    cut = {**record, "error": record["error"].rsplit(": ", 1)[0]}
    cut["error_detail"] = {**record["error_detail"], "message": cut["error"]}
    return cut


def _outcome(exc: BaseException | None, chunks: int) -> tuple[str, int]:
    return (type(exc).__name__ if exc is not None else "ok", chunks)


def run_sync(urls: dict[str, str], log_dir: Path) -> dict[str, tuple[str, int]]:
    """The traffic through one SyncVLLMMiddleware per base URL; what the caller saw per case."""
    clients = {
        key: SyncVLLMMiddleware(url, log_dir=log_dir, host="same", metadata={"app": "eq"})
        for key, url in urls.items()
    }
    seen: dict[str, tuple[str, int]] = {}
    for case, where, method, payload, kwargs, reading in TRAFFIC:
        call = getattr(clients[where], method)
        kwargs = {"model": MODEL, **kwargs, "metadata": {"case": case}}
        chunks = 0
        try:
            if not reading:
                call(payload, **kwargs)
            else:
                with call(payload, stream=True, **kwargs) as stream:
                    for _ in stream:
                        chunks += 1
                        if reading == "first":
                            break
        except APIError as exc:
            seen[case] = _outcome(exc, chunks)
        else:
            seen[case] = _outcome(None, chunks)
    for client in clients.values():
        client.close()
    return seen


async def run_async(urls: dict[str, str], log_dir: Path) -> dict[str, tuple[str, int]]:
    """`run_sync` through VLLMMiddleware."""
    clients = {
        key: VLLMMiddleware(url, log_dir=log_dir, host="same", metadata={"app": "eq"})
        for key, url in urls.items()
    }
    seen: dict[str, tuple[str, int]] = {}
    for case, where, method, payload, kwargs, reading in TRAFFIC:
        call = getattr(clients[where], method)
        kwargs = {"model": MODEL, **kwargs, "metadata": {"case": case}}
        chunks = 0
        try:
            if not reading:
                await call(payload, **kwargs)
            else:
                async with await call(payload, stream=True, **kwargs) as stream:
                    async for _ in stream:
                        chunks += 1
                        if reading == "first":
                            break
        except APIError as exc:
            seen[case] = _outcome(exc, chunks)
        else:
            seen[case] = _outcome(None, chunks)
    for client in clients.values():
        await client.close()
    return seen


def by_case(log_dir: Path) -> dict[str, dict[str, Any]]:
    records = [transport_text_cut(dict(record)) for record in load_logs(log_dir)]
    cases = {record["metadata"]["case"]: record for record in records}
    assert len(cases) == len(records) == len(TRAFFIC)
    return cases


def test_records_equal_the_async_clients_for_the_same_traffic(
    fake_vllm: FakeVLLMServer, garbage_url: str, tmp_path: Path
) -> None:
    urls = {
        "fake": fake_vllm.base_url,
        "closed": f"http://127.0.0.1:{closed_port()}/v1",
        "garbage": garbage_url,
    }
    seen_async = asyncio.run(run_async(urls, tmp_path / "async"))
    seen_sync = run_sync(urls, tmp_path / "sync")
    assert seen_sync == seen_async  # the same answers and exceptions reached the caller
    records_async, records_sync = by_case(tmp_path / "async"), by_case(tmp_path / "sync")
    ends = set()
    for case, expected in records_async.items():
        got = records_sync[case]
        assert list(got) == list(expected), case  # the same fields, in the same order
        for field, value in expected.items():
            assert normalized(got[field], field) == normalized(value, field), (case, field)
        ends.add(expected.get("stream_end"))
    # The traffic covers every way a call can end.
    assert ends >= {None, "completed", "abandoned", "error_event", "disconnected", "http_error"}
    assert {r["error_detail"]["kind"] for r in records_sync.values() if r["error"]} >= {
        "APIConnectionError",
        "APIError",
        "BadRequestError",
        "NotFoundError",
        "ServiceUnavailableError",
    }


# -- threads ------------------------------------------------------------------------------------
def test_one_client_shared_by_a_thread_pool(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    calls = 120

    def one(i: int) -> str:
        messages = [{"role": "user", "content": f"call {i}"}]
        if i % 3 == 0:
            with client.chat_completion(messages, model=MODEL, stream=True) as stream:
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in stream)
            return text
        reply = client.chat_completion(messages, model=MODEL, metadata={"i": i})
        return str(reply["choices"][0]["message"]["content"])

    with (
        SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path) as client,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        answers = list(pool.map(one, range(calls)))
        assert client.total_requests == calls
    # Each thread got its own answer (the fake echoes the prompt).
    assert all(answer == f"Echo: call {i}" for i, answer in enumerate(answers))
    records = load_logs(tmp_path)
    assert len(records) == calls
    assert len({r.request_id for r in records}) == calls
    assert all(r.error is None for r in records)
    prompts = {r["messages"][0]["content"] for r in records}
    assert prompts == {f"call {i}" for i in range(calls)}


def test_records_ship_to_redis_from_a_thread_pool(
    fake_vllm: FakeVLLMServer, redis_server: RedisServerProcess
) -> None:
    with (
        SyncVLLMMiddleware(fake_vllm.base_url, redis_url=redis_server.url, stream="t:logs") as c,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        list(pool.map(lambda i: c.completions(f"p{i}", model=MODEL), range(40)))
        assert c.mode == "redis"
    client = c.recorder.local_statistics()
    assert client["submitted"] == client["shipped"] == 40  # in Redis once close() returned
    with redis.Redis.from_url(redis_server.url) as server:
        assert server.xlen("t:logs") >= 1  # (records travel in bundles)


# -- the HTTP client ---------------------------------------------------------------------------
def test_an_injected_client_without_base_url(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    with httpx.Client() as http:
        with SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path, http_client=http) as c:
            assert c.chat_completion(HELLO, model=MODEL)["object"] == "chat.completion"
            with c.completions("x", model=MODEL, stream=True) as stream:
                assert len(list(stream)) > 1
            assert c.models()["data"][0]["id"] == MODEL
            assert c.health()
        assert not http.is_closed  # injected: the middleware does not close it
    assert len(load_logs(tmp_path)) == 2


def test_errors_are_typed_and_recorded(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    with SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path) as client:
        with pytest.raises(ServiceUnavailableError) as info:
            client.chat_completion([{"role": "user", "content": "[[status:503]]"}], model=MODEL)
        with pytest.raises(BadRequestError):
            client.completions("[[status:400]]", model=MODEL, stream=True)
    by_id = {r.request_id: r for r in load_logs(tmp_path)}
    assert by_id[info.value.request_id].status_code == 503
    assert [r.get("stream_end") for r in by_id.values()].count("http_error") == 1


def test_a_connection_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with SyncVLLMMiddleware(url, log_dir=tmp_path) as client:
        with pytest.raises(APIConnectionError):
            client.chat_completion(HELLO, model=MODEL)
        assert client.health() is False
    (record,) = load_logs(tmp_path)
    assert "connection failed" in str(record.error)


# -- streams ------------------------------------------------------------------------------------
def test_a_stream_with_an_error_event_raises_after_its_chunks(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "one two three [[midstream_error]]"}]
    got = []
    with SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path) as client:
        stream = client.chat_completion(messages, model=MODEL, stream=True)
        with pytest.raises(APIStatusError) as info, stream:
            for chunk in stream:
                got.append(chunk)
    assert got and info.value.in_stream
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "error_event" and record["chunks"] == len(got)


def test_a_dropped_stream_is_recorded_and_frees_its_connection(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    # One connection in the pool: a stream that kept it would make the next call time out.
    limits = httpx.Limits(max_connections=1)
    timeout = httpx.Timeout(10.0, pool=5.0)
    with httpx.Client(limits=limits, timeout=timeout) as http:
        client = SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path, http_client=http)
        stream = client.chat_completion(HELLO * 3, model=MODEL, stream=True)
        assert isinstance(stream, Stream)
        next(stream)
        del stream
        gc.collect()
        assert client.completions("after", model=MODEL)["object"] == "text_completion"
        client.close()
    ends = sorted(str(r.get("stream_end")) for r in load_logs(tmp_path))
    assert ends == ["None", "abandoned"]
    (dropped,) = [r for r in load_logs(tmp_path) if r.stream]
    assert "garbage-collected" in str(dropped.error) and dropped["chunks"] == 1


def test_closing_a_finished_stream_reads_its_usage(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    with SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path) as client:
        stream = client.chat_completion(HELLO, model=MODEL, stream=True)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                break
        stream.close()
        assert stream.closed
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "completed" and record.usage is not None


# -- lifecycle ----------------------------------------------------------------------------------
def test_a_client_dropped_unclosed_saves_its_records(
    fake_vllm: FakeVLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path, flush_interval=60)
    for _ in range(3):
        client.completions("x", model=MODEL)
    sink = client._sink
    assert sink is not None and sink.buffered == 3
    with caplog.at_level(logging.WARNING, "vllm_middleware"), pytest.warns(ResourceWarning):
        del client
        gc.collect()
    assert "SyncVLLMMiddleware (embedded) was garbage-collected without close()" in caplog.text
    assert asyncio.run(sink.wait_durable(20))
    assert len(load_logs(tmp_path)) == 3


def test_close_flushes_and_durable_waits(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    client = SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path, flush_interval=60)
    client.completions("x", model=MODEL)
    client.close()
    client.close()  # idempotent
    assert len(load_logs(tmp_path)) == 1
    durable = tmp_path / "durable"
    with SyncVLLMMiddleware(
        fake_vllm.base_url, log_dir=durable, flush_interval=60, durable=True
    ) as client:
        client.completions("y", model=MODEL)
        assert len(load_logs(durable)) == 1  # on disk before the call returned


def test_the_same_arguments_as_the_async_client() -> None:
    sync = inspect.signature(SyncVLLMMiddleware.__init__).parameters
    async_ = inspect.signature(VLLMMiddleware.__init__).parameters
    assert list(sync) == list(async_)
    for name, parameter in async_.items():
        assert (sync[name].kind, sync[name].default) == (parameter.kind, parameter.default), name

    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    # The async client's methods; its `aclose` / `aget_statistics` are the sync ones' names.
    names = public(VLLMMiddleware) - {"aclose", "aget_statistics"}
    assert public(SyncVLLMMiddleware) == names
    pairs = [(getattr(SyncVLLMMiddleware, name), getattr(VLLMMiddleware, name)) for name in names]
    pairs.append((SyncAudio.transcriptions, AsyncAudio.transcriptions))
    checked = set()
    for sync_method, async_method in pairs:
        if not inspect.isfunction(async_method):
            continue  # properties and attributes
        name = async_method.__name__
        sync_signature, async_signature = map(inspect.signature, (sync_method, async_method))
        assert sync_signature.parameters == async_signature.parameters, name
        # The same docstrings, but for the stream type they name.
        doc = (async_method.__doc__ or "").replace("an `AsyncStream`", "a `Stream`")
        assert sync_method.__doc__ == doc, name
        assert not inspect.iscoroutinefunction(sync_method), name
        checked.add(name)
    assert checked >= {"embeddings", "responses", "request", "transcriptions", "chat_completion"}


def test_media_from_threads_is_moved_to_files(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    # (No event loop in these threads: the media pipeline finishes the record where it is.)
    images = [hashlib.sha256(str(i).encode()).digest() * 2000 for i in range(4)]

    def one(image: bytes) -> None:
        url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
        client.chat_completion([{"role": "user", "content": parts}], model=MODEL)

    with (
        SyncVLLMMiddleware(fake_vllm.base_url, log_dir=tmp_path) as client,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        list(pool.map(one, images))
    stored = set()
    for record in load_logs(tmp_path):
        ref = record["messages"][0]["content"][0]["image_url"]["url"]["media_ref"]
        stored.add((tmp_path / ref["path"]).read_bytes())
    assert stored == set(images)


def test_records_buffered_at_exit_are_written(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    # A script that never closes its client: the records still in memory at interpreter exit
    # are written (the sink's exit handler), as with the async client.
    program = textwrap.dedent(
        f"""
        from vllm_middleware import SyncVLLMMiddleware

        client = SyncVLLMMiddleware(
            {fake_vllm.base_url!r}, log_dir={str(tmp_path)!r}, redis_url="", flush_interval=60
        )
        for _ in range(3):
            client.completions("x", model={MODEL!r})
        print(client.get_statistics()["client"]["buffered"], flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["3"], "the records were not in memory at exit"
    assert len(load_logs(tmp_path)) == 3
