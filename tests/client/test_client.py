"""The client's request path: errors become records and typed exceptions; logging never hurts."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest
from vllm_middleware import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    VLLMMiddleware,
    VLLMMiddlewareError,
    load_logs,
)
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

MODEL = "vllm:qwen-2.5-omni-7b"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_error_is_logged_and_raised(tmp_path: Path) -> None:
    async with VLLMMiddleware(
        base_url=f"http://127.0.0.1:{closed_port()}/v1", log_dir=tmp_path
    ) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.chat_completion(HELLO, model=MODEL)
    assert isinstance(info.value, VLLMMiddlewareError)
    (record,) = load_logs(tmp_path)
    assert record.request_id == info.value.request_id
    assert record.status_code is None and "connection failed" in record.error
    assert record.error_detail["kind"] == "APIConnectionError"


async def test_timeout_is_logged_and_raised(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path, timeout=0.5) as client:
        with pytest.raises(APITimeoutError):
            await client.chat_completion([{"role": "user", "content": "[[hang]]"}], model=MODEL)
    (record,) = load_logs(tmp_path)
    assert record.error_detail["kind"] == "APITimeoutError"
    assert 400 < record.latency_ms < 5000


@pytest.mark.parametrize(
    ("content", "model", "exc_type", "status"),
    [
        ("hello", "no-such-model", NotFoundError, 404),
        ("[[status:503]]", MODEL, ServiceUnavailableError, 503),
        ("[[status:400]]", MODEL, BadRequestError, 400),
    ],
)
async def test_http_errors_become_typed_exceptions_and_records(
    fake_vllm_any: FakeVLLMServer,
    tmp_path: Path,
    content: str,
    model: str,
    exc_type: type[APIError],
    status: int,
) -> None:
    async with VLLMMiddleware(base_url=fake_vllm_any.base_url, log_dir=tmp_path) as client:
        with pytest.raises(exc_type) as info:
            await client.chat_completion([{"role": "user", "content": content}], model=model)
    assert info.value.status_code == status  # type: ignore[attr-defined]
    (record,) = load_logs(tmp_path)
    assert record.status_code == status
    assert record.error_detail["message"] == info.value.message
    assert record.error_detail["type"] == info.value.error_type  # type: ignore[attr-defined]


@pytest.mark.parametrize("shape", ["flat", "nested"])
async def test_both_error_envelopes(tmp_path: Path, shape: str) -> None:
    with FakeVLLMServer(error_shape=shape) as server:  # type: ignore[arg-type]
        async with VLLMMiddleware(base_url=server.base_url, log_dir=tmp_path) as client:
            with pytest.raises(NotFoundError) as info:
                await client.completions(prompt="x", model="nope")
    assert info.value.param == "model" and "does not exist" in info.value.message


async def test_api_key_failure_is_an_authentication_error(tmp_path: Path) -> None:
    with FakeVLLMServer(api_key="secret") as server:
        async with VLLMMiddleware(
            base_url=server.base_url, log_dir=tmp_path, api_key="wrong"
        ) as client:
            with pytest.raises(AuthenticationError) as info:
                await client.completions(prompt="x", model=MODEL)
        assert info.value.message == "Unauthorized" and info.value.status_code == 401
        async with VLLMMiddleware(
            base_url=server.base_url, log_dir=tmp_path, api_key="secret"
        ) as client:
            await client.completions(prompt="x", model=MODEL)


async def test_unserializable_request_is_a_clear_error_and_a_record(tmp_path: Path) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://x/v1") as http,
        VLLMMiddleware(http_client=http, log_dir=tmp_path) as client,
    ):
        with pytest.raises(InvalidRequestError, match="not JSON-serializable"):
            await client.chat_completion([{"role": "user", "content": object()}], model="m")
    (record,) = load_logs(tmp_path)
    assert record.error_detail["kind"] == "InvalidRequestError"


async def test_invalid_json_from_the_server(tmp_path: Path) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b"<html>"))
    async with httpx.AsyncClient(transport=transport, base_url="http://x/v1") as http:
        async with VLLMMiddleware(http_client=http, log_dir=tmp_path) as client:
            with pytest.raises(APIError, match="invalid JSON"):
                await client.completions(prompt="x", model="m")
        assert not http.is_closed  # injected: the middleware does not close it
    (record,) = load_logs(tmp_path)
    assert record.status_code == 200 and record.response is None


async def test_logging_failure_never_reaches_the_caller(
    fake_vllm: FakeVLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vllm_middleware._recorder as call_module

    def broken(record: object) -> bytes:
        raise RuntimeError("encoder exploded")

    # Both encoders the recorder may use: orjson inline, `encode_record` for the rest.
    monkeypatch.setattr(call_module, "_dumps", broken)
    monkeypatch.setattr(call_module, "encode_record", broken)
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path) as client:
        result = await client.completions(prompt="x", model=MODEL)
        assert result["object"] == "text_completion"
        assert client.get_statistics()["client"]["logging_errors"] == 1


async def test_broken_sink_never_reaches_the_caller(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log directory should be")
    client = VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=blocker, flush_interval=0.01)
    for _ in range(5):
        await client.completions(prompt="x", model=MODEL)
    deadline = time.monotonic() + 10  # the writer process starts first, then fails the batch
    while not client.get_statistics()["client"]["failed_batches"]:
        assert time.monotonic() < deadline, "the broken sink was never tried"
        await asyncio.sleep(0.01)
    stats = client.get_statistics()["client"]
    assert stats["failed_batches"] >= 1 and "NotADirectoryError" in stats["last_error"]
    assert stats["buffered"] == 5  # kept for a retry, not lost yet
    await client.close(timeout=0.2)
    # The embedded sink is shared by the process's clients: it keeps retrying after this
    # client let go, and whatever it has to give up on when it closes is counted.
    assert client.get_statistics()["client"]["buffered"] == 5
    assert client._sink is not None
    await client._sink.aclose(timeout=0.2)
    assert client.get_statistics()["client"]["dropped"] == 5  # counted, never silent


async def test_metadata_per_client_and_per_call(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, log_dir=tmp_path, metadata={"app": "a", "v": 1}, host="h1"
    ) as client:
        await client.completions(prompt="x", model=MODEL)
        await client.completions(prompt="y", model=MODEL, metadata={"v": 2, "user": "u"})
    first, second = load_logs(tmp_path)
    assert first.metadata == {"app": "a", "v": 1}
    assert second.metadata == {"app": "a", "v": 2, "user": "u"}
    assert first.host == "h1"


async def test_cancelled_call_leaves_one_record(fake_vllm: FakeVLLMServer, tmp_path: Path) -> None:
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path) as client:
        task = asyncio.create_task(
            client.chat_completion([{"role": "user", "content": "[[hang]]"}], model=MODEL)
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (record,) = load_logs(tmp_path)
    assert "cancelled" in record.error


async def test_full_buffer_drops_are_counted_and_calls_stay_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No spool: with Redis down nothing can take the records, so the buffer fills.
    monkeypatch.setenv("VLLM_MW_SPOOL", "0")
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"id": "x"}))
    redis_url = f"redis://127.0.0.1:{closed_port()}/0"  # nothing listens: every flush fails
    async with httpx.AsyncClient(transport=transport, base_url="http://x/v1") as http:
        client = VLLMMiddleware(http_client=http, redis_url=redis_url, max_buffer=100)
        started = time.perf_counter()
        for _ in range(1000):
            await client.completions(prompt="x", model="m")
        elapsed = time.perf_counter() - started
        stats = client.get_statistics()
        assert stats["client"]["dropped"] == 900 and stats["client"]["buffered"] == 100
        assert "redis_error" in stats
        await client.close(timeout=0.5)
    assert elapsed < 5  # generous: a blocking logger would wait on every connect


async def test_redis_mode_statistics(
    fake_vllm: FakeVLLMServer, redis_server: RedisServerProcess
) -> None:
    async with VLLMMiddleware(base_url=fake_vllm.base_url, redis_url=redis_server.url) as client:
        await client.completions(prompt="x", model=MODEL)
        stats = await client.aget_statistics()
        assert stats["mode"] == "redis" and stats["client"]["requests"] == 1
        for key in ("total_requests", "log_directory", "logging_enabled", "log_files_count"):
            assert key in stats
    # No worker ran: the record waits in the stream.
    import redis as sync_redis

    with sync_redis.Redis.from_url(redis_server.url) as raw:
        (entry,) = raw.xrange("vllm:logs")
        assert orjson.loads(entry[1][b"rec"])["prompt"] == "x"


def test_bad_settings_are_rejected_at_construction() -> None:
    with pytest.raises(ConfigurationError):
        VLLMMiddleware(log_format="xml")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        VLLMMiddleware(max_log_size_mb=0)


async def test_durable_calls_return_after_the_record_is_on_disk(
    fake_vllm: FakeVLLMServer, tmp_path: Path
) -> None:
    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, log_dir=tmp_path, durable=True, flush_interval=10.0
    ) as client:
        await client.completions(prompt="first", model=MODEL)
        # No flush interval has passed: only `durable` can explain the record being there.
        assert [r.prompt for r in load_logs(tmp_path)] == ["first"]
        with pytest.raises(NotFoundError):
            await client.completions(prompt="second", model="nope")
        assert [r.prompt for r in load_logs(tmp_path)] == ["first", "second"]


async def test_durable_calls_in_redis_mode(
    fake_vllm: FakeVLLMServer, redis_server: RedisServerProcess
) -> None:
    import redis as sync_redis

    async with VLLMMiddleware(
        base_url=fake_vllm.base_url, redis_url=redis_server.url, durable=True, flush_interval=10.0
    ) as client:
        await client.completions(prompt="x", model=MODEL)
        with sync_redis.Redis.from_url(redis_server.url) as raw:
            assert raw.xlen("vllm:logs") == 1
