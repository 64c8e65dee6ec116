"""The real `openai` SDK (3.x on httpx2, or 2.x on httpx: whichever this environment has),
instrumented, against the real fake vLLM server: every SDK feature leaves one record per HTTP
exchange, and the SDK sees the server's bytes unchanged."""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_middleware import instrument, load_logs
from vllm_middleware_testing import FakeVLLMServer

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

SECRET = "sk-never-in-a-record-1234"
USER = [{"role": "user", "content": "hello there"}]


def http_library(client: Any) -> Any:
    """The module (httpx or httpx2) the SDK client's HTTP client comes from."""
    for cls in type(client._client).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in ("httpx", "httpx2"):
            return importlib.import_module(root)
    raise AssertionError(type(client._client))


@pytest.fixture(scope="module")
def server() -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer() as fake:
        yield fake


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path / "logs"


def records(log_dir: Path) -> list[dict[str, Any]]:
    found = [r.to_dict() for r in load_logs(log_dir)]
    return sorted(found, key=lambda r: r["timestamp"])


def no_secret(log_dir: Path) -> None:
    for path in log_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and b"uthorization" not in data, path


def sync_client(server: FakeVLLMServer, logs: Path, **kwargs: Any) -> Any:
    sdk = openai.OpenAI(base_url=server.base_url, api_key=SECRET, **kwargs)
    return instrument(sdk, log_dir=logs, metadata={"service": "tests"})


def async_client(server: FakeVLLMServer, logs: Path, **kwargs: Any) -> Any:
    sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key=SECRET, **kwargs)
    return instrument(sdk, log_dir=logs, metadata={"service": "tests"})


# -- plain calls ---------------------------------------------------------------------------------
def test_chat_record_metadata_header_stripped_and_no_secret(
    server: FakeVLLMServer, logs: Path
) -> None:
    client = sync_client(server, logs)
    meta = json.dumps({"user": "u-1", "tenant": 7})
    answer = client.chat.completions.create(
        model=server.model,
        messages=USER,
        temperature=0.5,
        extra_headers={"X-VLLM-MW-Metadata": meta, "X-Request-Id": "rid-42"},
    )
    client.close()
    sent = server.requests[-1]
    assert not any(name.startswith("x-vllm-mw") for name in sent.headers)
    [record] = records(logs)
    assert record["endpoint"] == "chat/completions" and record["status_code"] == 200
    assert record["messages"] == USER and record["model"] == server.model
    assert record["parameters"] == {"temperature": 0.5}
    assert record["metadata"] == {"service": "tests", "user": "u-1", "tenant": 7}
    assert record["client_request_id"] == "rid-42"
    assert record["response"] == answer.model_dump(mode="json", exclude_unset=True)
    assert record["usage"] == answer.usage.model_dump(mode="json", exclude_unset=True)
    assert record["error"] is None and record["stream"] is False
    assert "capture_notes" not in record and "attempt" not in record
    no_secret(logs)


def test_host_header_sets_the_partition_bad_one_is_a_note(
    server: FakeVLLMServer, logs: Path
) -> None:
    client = sync_client(server, logs)
    client.chat.completions.create(
        model=server.model, messages=USER, extra_headers={"X-VLLM-MW-Host": "app-7"}
    )
    for host in ("../../etc", ""):
        client.chat.completions.create(
            model=server.model, messages=USER, extra_headers={"X-VLLM-MW-Host": host}
        )
    client.close()
    assert not any(name.startswith("x-vllm-mw") for name in server.requests[-1].headers)
    chosen, escaping, empty = records(logs)
    assert chosen["host"] == "app-7" and list(logs.glob("date=*/host=app-7/*"))
    # Kept as given in the record, its partition stays inside the log directory.
    assert escaping["host"] == "../../etc" and list(logs.glob("date=*/host=___.._etc/*"))
    assert empty["host"] not in ("", "app-7")  # the recorder's own host
    assert "x-vllm-mw-host ignored: the host is empty" in empty["capture_notes"][0]
    assert sorted(p.name for p in logs.iterdir()) == [chosen["timestamp"][:10].join(["date=", ""])]


def test_invalid_metadata_header_is_a_note_not_an_error(server: FakeVLLMServer, logs: Path) -> None:
    client = sync_client(server, logs)
    answer = client.chat.completions.create(
        model=server.model, messages=USER, extra_headers={"X-VLLM-MW-Metadata": "{not json"}
    )
    client.close()
    assert answer.choices[0].message.content
    [record] = records(logs)
    assert record["error"] is None and record["metadata"] == {"service": "tests"}
    assert "x-vllm-mw-metadata is not JSON" in record["capture_notes"][0]


def test_completions_and_embeddings(server: FakeVLLMServer, logs: Path) -> None:
    client = sync_client(server, logs)
    client.completions.create(model=server.model, prompt="Once", max_tokens=5)
    embedded = client.embeddings.create(model=server.model, input=["a b", "c"], dimensions=4)
    client.close()
    completion, embeddings = records(logs)
    assert completion["endpoint"] == "completions" and completion["prompt"] == "Once"
    assert completion["parameters"] == {"max_tokens": 5}
    assert embeddings["endpoint"] == "embeddings" and embeddings["input"] == ["a b", "c"]
    assert embeddings["parameters"] == {"dimensions": 4, "encoding_format": "base64"}  # the SDK's
    stored = embeddings["response"]["data"][0]["embedding"]
    assert set(stored) == {"dimensions", "sha256"}  # the vector itself is not kept
    assert len(embedded.data[0].embedding) == 4


def test_tools_and_parse_structured_output(server: FakeVLLMServer, logs: Path) -> None:
    class GetWeather(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        city: str

    client = sync_client(server, logs)
    tool = openai.pydantic_function_tool(GetWeather)
    parsed = client.chat.completions.parse(
        model=server.model,
        messages=[{"role": "user", "content": "Weather in Zurich?"}],
        tools=[tool],
        tool_choice="required",
    )
    client.close()
    call = parsed.choices[0].message.tool_calls[0]
    assert call.function.parsed_arguments == GetWeather(city="Zurich")
    [record] = records(logs)
    assert record["parameters"]["tools"][0]["function"]["name"] == "GetWeather"
    recorded_call = record["response"]["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(recorded_call["function"]["arguments"]) == {"city": "Zurich"}


def test_raw_and_streaming_responses(server: FakeVLLMServer, logs: Path) -> None:
    client = sync_client(server, logs)
    raw = client.chat.completions.with_raw_response.create(model=server.model, messages=USER)
    assert raw.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        model=server.model, messages=USER, stream=True
    ) as response:
        lines = list(response.iter_lines())
    client.close()
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    plain, streamed = records(logs)
    assert plain["response"] == json.loads(raw.content)
    assert streamed["stream"] is True and streamed["stream_end"] == "completed"
    assert streamed["response"]["choices"][0]["message"]["content"]


def test_audio_upload_and_unknown_route(server: FakeVLLMServer, logs: Path) -> None:
    client = sync_client(server, logs)
    audio = b"RIFF" + bytes(range(256)) * 8
    text = client.audio.transcriptions.create(
        model=server.model, file=("clip.wav", audio, "audio/wav"), language="en"
    )
    models = client.models.list()
    client.close()
    assert text.text and models.data
    transcription, listing = records(logs)
    assert transcription["endpoint"] == "audio/transcriptions"
    assert transcription["parameters"] == {"language": "en"}
    part = transcription["messages"][0]["content"][0]
    assert part["type"] == "input_audio"
    assert listing["endpoint"] == "models" and listing["input"] is None
    assert listing["response"]["data"][0]["id"] == server.model


# -- streams -------------------------------------------------------------------------------------
def test_stream_iterated_broken_closed_dropped_one_record_each(
    server: FakeVLLMServer, logs: Path
) -> None:
    client = sync_client(server, logs)
    long = [{"role": "user", "content": "tell me a long story " * 5}]
    stream = client.chat.completions.create(model=server.model, messages=USER, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with client.chat.completions.create(model=server.model, messages=long, stream=True) as s:
        for _ in s:
            break  # leaving the with-block closes it
    closed = client.chat.completions.create(model=server.model, messages=long, stream=True)
    next(iter(closed))
    closed.close()
    dropped = client.chat.completions.create(model=server.model, messages=long, stream=True)
    next(iter(dropped))
    del dropped
    gc.collect()
    client.close()
    done, broken, closed_record, dropped_record = records(logs)
    assert done["stream_end"] == "completed" and done["error"] is None
    assert done["response"]["choices"][0]["message"]["content"] == text
    assert done["chunks"] >= 3 and done["ttft_ms"] is not None
    for record in (broken, closed_record, dropped_record):
        assert record["stream_end"] == "abandoned" and record["chunks"] >= 1
    assert closed_record["error"] == "stream closed by the caller after 1 chunks"
    assert dropped_record["error"] == "stream garbage-collected unclosed after 1 chunks"


def test_responses_api_plain_and_streamed(server: FakeVLLMServer, logs: Path) -> None:
    client = sync_client(server, logs)
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    plain = client.responses.create(model=server.model, input="hi", tools=tools)
    events = list(client.responses.create(model=server.model, input="hi", stream=True))
    client.close()
    first, streamed = records(logs)
    assert first["endpoint"] == "responses" and first["input"] == "hi"
    assert first["parameters"]["tools"] == tools
    assert first["response"]["id"] == plain.id
    assert streamed["stream_end"] == "completed" and streamed["chunks"] == len(events)
    assert streamed["response"] == events[-1].response.model_dump(mode="json", exclude_unset=True)


# -- failures ------------------------------------------------------------------------------------
def test_retries_each_attempt_recorded_and_linked(server: FakeVLLMServer, logs: Path) -> None:
    client = sync_client(server, logs, max_retries=1)
    busy = [{"role": "user", "content": "[[status:503]]"}]
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=server.model, messages=busy)
    client.chat.completions.create(model=server.model, messages=USER)
    client.close()
    first, second, fine = records(logs)
    assert (first["attempt"], second["attempt"]) == (0, 1)
    assert first["retry_group"] == second["retry_group"] == first["request_id"]
    assert first["status_code"] == second["status_code"] == 503
    assert first["error_detail"]["kind"] == "ServiceUnavailableError"
    assert "retry_group" not in fine and "attempt" not in fine


def test_timeout_and_connection_error_recorded_and_raised_unchanged(
    server: FakeVLLMServer, logs: Path
) -> None:
    client = sync_client(server, logs, max_retries=0, timeout=0.3)
    slow = [{"role": "user", "content": "[[slow:3]]"}]
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=server.model, messages=slow)
    client.close()
    nowhere = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key=SECRET, max_retries=0)
    nowhere = instrument(nowhere, log_dir=logs)
    with pytest.raises(openai.APIConnectionError) as caught:
        nowhere.chat.completions.create(model=server.model, messages=USER)
    nowhere.close()
    assert not isinstance(caught.value, openai.APITimeoutError)
    timed_out, refused = records(logs)
    assert timed_out["error_detail"]["kind"] == "APITimeoutError"
    assert refused["error_detail"]["kind"] == "APIConnectionError"
    assert timed_out["status_code"] is None and refused["status_code"] is None
    no_secret(logs)


def test_stream_cut_by_server_and_in_band_error(server: FakeVLLMServer, logs: Path) -> None:
    cut = [{"role": "user", "content": "one two three four [[drop]]"}]
    raised = []
    bare = openai.OpenAI(base_url=server.base_url, api_key=SECRET, max_retries=0)
    client = sync_client(server, logs, max_retries=0)
    for sdk in (bare, client):
        with pytest.raises(Exception) as caught:  # what the SDK raises varies by version
            for _ in sdk.chat.completions.create(model=server.model, messages=cut, stream=True):
                pass
        raised.append(type(caught.value))
    assert raised[0] is raised[1]  # the transport re-raises what the HTTP layer raised
    bare.close()
    failing = [{"role": "user", "content": "one two three four [[midstream_error]]"}]
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model=server.model, messages=failing, stream=True):
            pass
    client.close()
    dropped, failed = records(logs)
    assert dropped["stream_end"] == "disconnected" and dropped["chunks"] >= 1
    assert dropped["error_detail"]["kind"] in ("APIConnectionError", "APITimeoutError")
    assert failed["stream_end"] == "error_event" and failed["error_detail"]["status_code"] >= 400


def test_redis_mode(server: FakeVLLMServer, redis_server: Any) -> None:
    import redis as redis_py

    sdk = openai.OpenAI(base_url=server.base_url, api_key=SECRET)
    client = instrument(sdk, redis_url=redis_server.url, host="app-7")
    client.chat.completions.create(model=server.model, messages=USER)
    client.close()  # flushes into the stream
    entries = redis_py.Redis.from_url(redis_server.url).xrange("vllm:logs")
    assert len(entries) == 1
    assert SECRET.encode() not in repr(entries).encode()


# -- bytes unchanged -----------------------------------------------------------------------------
def exchange_bytes(client: Any, model: str, rid: str) -> tuple[bytes, bytes]:
    headers = {"X-Request-Id": rid}
    plain = client.chat.completions.with_raw_response.create(
        model=model, messages=USER, extra_headers=headers
    ).content
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=USER, stream=True, extra_headers=headers
    ) as response:
        streamed = b"".join(response.iter_bytes())
    return plain, streamed


def test_caller_gets_the_servers_bytes(server: FakeVLLMServer, logs: Path) -> None:
    bare = openai.OpenAI(base_url=server.base_url, api_key=SECRET)
    captured = sync_client(server, logs)
    for _ in range(3):  # the server's `created` is in seconds: compare within one second
        expected = exchange_bytes(bare, server.model, "same-id")
        got = exchange_bytes(captured, server.model, "same-id")
        if got == expected:
            break
    bare.close()
    captured.close()
    assert got == expected
    assert b"data: [DONE]" in got[1]
    assert len(records(logs)) >= 2


# -- async ---------------------------------------------------------------------------------------
async def test_async_chat_stream_close_drop_and_responses(
    server: FakeVLLMServer, logs: Path
) -> None:
    client = async_client(server, logs)
    await client.chat.completions.create(model=server.model, messages=USER)
    stream = await client.chat.completions.create(model=server.model, messages=USER, stream=True)
    async for _ in stream:
        pass
    closed = await client.chat.completions.create(model=server.model, messages=USER, stream=True)
    await closed.__anext__()
    await closed.close()
    dropped = await client.chat.completions.create(model=server.model, messages=USER, stream=True)
    await dropped.__anext__()
    del dropped
    gc.collect()
    events = await client.responses.create(model=server.model, input="hi", stream=True)
    async for _ in events:
        pass
    await client.close()
    found = records(logs)
    ends = [r.get("stream_end") for r in found]
    assert ends == [None, "completed", "abandoned", "abandoned", "completed"]
    assert "closed by the caller" in found[2]["error"]
    assert "garbage-collected" in found[3]["error"]
    assert found[4]["endpoint"] == "responses" and found[4]["response"]["status"] == "completed"


async def test_async_retries_and_timeouts(server: FakeVLLMServer, logs: Path) -> None:
    client = async_client(server, logs, max_retries=1, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "[[slow:3]]"}]
        )
    await client.close()
    first, second = records(logs)
    assert first["error_detail"]["kind"] == second["error_detail"]["kind"] == "APITimeoutError"
    assert first["retry_group"] == second["retry_group"]
    assert (first["attempt"], second["attempt"]) == (0, 1)


async def test_async_call_cancelled_by_the_caller(server: FakeVLLMServer, logs: Path) -> None:
    client = async_client(server, logs, max_retries=2)
    slow = [{"role": "user", "content": "[[slow:3]]"}]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await client.chat.completions.create(model=server.model, messages=slow)
    await client.close()
    [record] = records(logs)
    assert record["error"] == "cancelled by the caller before the response"
    assert "retry_group" not in record  # nobody retries a cancelled call


# -- the same records as the middleware's own client ---------------------------------------------
def sdk_golden_traffic(server: FakeVLLMServer, log_dir: Path) -> None:
    """`test_record_equality`'s traffic, made through the SDK (the closed-early stream aside:
    where it is cut depends on how the bytes arrive)."""
    sdk = openai.OpenAI(base_url=server.base_url, api_key=SECRET, max_retries=0)
    client = instrument(sdk, log_dir=log_dir, host="golden", metadata={"app": "golden"})
    model = server.model
    messages = [{"role": "user", "content": "Hello there"}]
    client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0.0,
        max_tokens=8,
        extra_headers={"X-VLLM-MW-Metadata": '{"n": 1}'},
    )
    client.completions.create(
        model=model, prompt="Once upon", max_tokens=5, extra_headers={"X-Request-Id": "golden-2"}
    )
    usage = {"include_usage": True}  # the middleware's client asks for it itself
    for _ in client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, stream=True, stream_options=usage
    ):
        pass
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        tool_choice="required",
    )
    client.embeddings.create(model=model, input=["a", "b"], dimensions=4)
    client.responses.create(model=model, input="Say hi", max_output_tokens=5)
    for _ in client.responses.create(
        model=model, input="Say hi twice", max_output_tokens=5, stream=True
    ):
        pass
    client.post(server.url + "/tokenize", body={"prompt": "hello"}, cast_to=object)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=messages, max_tokens=-1)
    client.close()


def as_the_client_sends(record: dict[str, Any]) -> dict[str, Any]:
    """What the SDK itself sends differently from the middleware's client, undone."""
    params = dict(record["parameters"])
    if record["endpoint"] == "embeddings":
        params.pop("encoding_format")  # the SDK asks for base64 (hashed the same)
    if record["stream"] and record["endpoint"] == "chat/completions":
        params.pop("stream_options")  # the client asks for usage without saying so
    if record["error"] is not None:
        record = {**record, "model": None}  # the SDK always sends a model
    return {**record, "parameters": params}


def test_records_equal_the_middleware_clients(server: FakeVLLMServer, logs: Path) -> None:
    golden = importlib.import_module("tests.client.test_record_equality")
    sdk_golden_traffic(server, logs)
    written = [
        as_the_client_sends(golden._normalized(json.loads(line)))
        for path in sorted(logs.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    pinned = [json.loads(line) for line in golden.GOLDEN.read_text().splitlines()]
    closed_early = [r for r in pinned if r.get("stream_end") == "abandoned"]
    assert len(closed_early) == 1 and len(written) == len(pinned) - 1
    for record in written:
        assert record in pinned, record
