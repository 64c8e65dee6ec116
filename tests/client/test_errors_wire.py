"""vLLM's error envelopes, extra request fields, request ids, /v1/models and /health."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_middleware import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    ServiceUnavailableError,
    VLLMMiddleware,
    load_logs,
)
from vllm_middleware_testing import QUEUE_FULL_MESSAGE, FakeVLLMServer


@pytest.fixture(params=[("v0.33", "nested"), ("v0.10.2", "nested"), ("v0.10.2", "flat")])
def server(request: pytest.FixtureRequest) -> Iterator[FakeVLLMServer]:
    flavor, shape = request.param
    with FakeVLLMServer(flavor=flavor, error_shape=shape) as fake:
        yield fake


@pytest.mark.parametrize("stream", [False, True])
async def test_queue_full_before_the_stream(
    server: FakeVLLMServer, tmp_path: Path, stream: bool
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    with pytest.raises(ServiceUnavailableError) as caught:
        await client.chat_completion(
            [{"role": "user", "content": "hi [[status:503]]"}], stream=stream
        )
    await client.close()
    error = caught.value
    assert (error.status_code, error.error_type, error.message, error.param) == (
        503,
        "Service Unavailable",
        QUEUE_FULL_MESSAGE,
        None,
    )
    assert not error.in_stream
    (record,) = load_logs(tmp_path)
    assert record["status_code"] == 503 and record["stream"] is stream
    assert record["error_detail"]["type"] == "Service Unavailable"
    # A stream that failed before its first byte still says how it ended.
    assert record.get("stream_end") == ("http_error" if stream else None)


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_names_the_param(
    server: FakeVLLMServer, tmp_path: Path, stream: bool
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    with pytest.raises(NotFoundError) as caught:
        await client.completions("hi", model="nope", stream=stream)
    await client.close()
    assert caught.value.error_type == "NotFoundError"
    assert caught.value.param == ("model" if server.flavor == "v0.33" else None)
    assert "`nope` does not exist" in caught.value.message


async def test_validation_error(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    with pytest.raises(BadRequestError) as caught:
        await client.chat_completion([{"role": "user", "content": "hi"}], n=0, stream=True)
    await client.close()
    # n=0 passes v0.33's request model and fails in SamplingParams (a VLLMValidationError
    # without a parameter); v0.10.2's request model rejected it.
    new = server.flavor == "v0.33"
    assert caught.value.status_code == 400
    assert caught.value.error_type == ("BadRequestError" if new else "Bad Request")
    assert caught.value.param is None
    assert "n must be at least 1, got 0." in caught.value.message


@pytest.mark.parametrize("stream", [False, True])
async def test_model_validator_errors_name_the_parameter(
    server: FakeVLLMServer, tmp_path: Path, stream: bool
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    with pytest.raises(BadRequestError) as caught:
        await client.chat_completion([{"role": "user", "content": "hi"}], tools=[], stream=stream)
    await client.close()
    error = caught.value
    if server.flavor == "v0.33":
        assert (error.error_type, error.param) == ("BadRequestError", "tools")
        assert error.message.endswith("omit the field entirely. (parameter=tools)")
    else:
        assert (error.error_type, error.param) == ("Bad Request", None)
    (record,) = load_logs(tmp_path)
    assert record["error_detail"]["param"] == error.param


@pytest.mark.parametrize("stream", [False, True])
async def test_unauthorized_string_body(tmp_path: Path, stream: bool) -> None:
    with FakeVLLMServer(api_key="secret") as server:
        client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="", api_key="bad")
        with pytest.raises(AuthenticationError) as caught:
            await client.chat_completion([{"role": "user", "content": "hi"}], stream=stream)
        await client.close()
    assert caught.value.status_code == 401 and caught.value.message == "Unauthorized"
    assert isinstance(caught.value, APIStatusError) and caught.value.error_type is None
    (record,) = load_logs(tmp_path)
    assert record["error_detail"]["status_code"] == 401


@pytest.mark.parametrize("stream", [False, True])
async def test_vllm_extras_pass_through_and_are_recorded(
    server: FakeVLLMServer, tmp_path: Path, stream: bool
) -> None:
    extras = {
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
        "structured_outputs": {"json": {"type": "object"}},
        "chat_template_kwargs": {"enable_thinking": False},
        "request_id": "job-123",
        "priority": 0,
        "vllm_xargs": {"a": 1},
    }
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    result = await client.chat_completion(
        [{"role": "user", "content": "hi"}], temperature=0.7, stream=stream, **extras
    )
    if stream:
        async with result:  # type: ignore[union-attr]
            chunks = [c async for c in result]  # type: ignore[union-attr]
        assert chunks[0]["id"] == "chatcmpl-job-123"
    else:
        assert result["id"] == "chatcmpl-job-123"  # type: ignore[index]
    await client.close()
    sent = server.requests[-1].body
    for key, value in extras.items():
        assert sent[key] == value
    (record,) = load_logs(tmp_path)
    expected = {**extras, "temperature": 0.7}
    if stream:
        expected["stream"] = True
    assert record["parameters"] == expected
    assert record["client_request_id"] == "job-123"


async def test_header_request_id_wins(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    result = await client.chat_completion(
        [{"role": "user", "content": "hi"}], request_id="body", headers={"X-Request-Id": "hdr"}
    )
    await client.close()
    assert result["id"] == "chatcmpl-hdr"
    assert server.requests[-1].headers["x-request-id"] == "hdr"
    (record,) = load_logs(tmp_path)
    assert record["client_request_id"] == "hdr"


async def test_models_and_health(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    models = await client.models()
    assert models["object"] == "list" and models["data"][0]["id"] == server.model
    assert await client.health() is True
    server.stop()
    assert await client.health(timeout=1) is False
    await client.close()
    assert list(load_logs(tmp_path)) == []  # control-plane calls are not records


async def test_models_unauthorized(tmp_path: Path) -> None:
    with FakeVLLMServer(api_key="k") as server:
        client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
        with pytest.raises(AuthenticationError):
            await client.models()
        assert await client.health()  # /health is outside the key-guarded /v1 paths
        await client.close()
