"""Streaming against the real fake vLLM server, in both wire flavours.

For every scenario: the chunks the caller receives equal what plain httpx with hand-written SSE
parsing receives for the caller's own request, and the record's reassembled response equals the
non-streaming response to the same request.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from vllm_middleware import APIConnectionError, APIStatusError, VLLMMiddleware, load_logs
from vllm_middleware import _streaming as streaming
from vllm_middleware._reassembly import SSEDecoder
from vllm_middleware_testing import FakeVLLMServer

FLAVORS = ["v0.33", "v0.10.2"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


@pytest.fixture(params=FLAVORS)
def server(request: pytest.FixtureRequest) -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer(flavor=request.param) as fake:
        yield fake


def raw_events(text: str) -> list[str]:
    """Independent SSE parsing of a whole body: blank-line separated events, data lines only."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n") if line[:5] == "data:"]
        if data:
            events.append("\n".join(data))
    return events


async def raw_stream(server: FakeVLLMServer, path: str, body: dict[str, Any]) -> list[Any]:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{server.base_url}/{path}", json=body)
    events = raw_events(response.text)
    assert events[-1] == "[DONE]"
    return [orjson.loads(event) for event in events[:-1]]


def normalize_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """Drop what differs between two identical requests: the time and tool-call ids."""
    out = dict(chunk)
    out.pop("created", None)
    choices = []
    for choice in out.get("choices", []):
        choice = dict(choice)
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("tool_calls"):
            delta = dict(delta)
            delta["tool_calls"] = [
                {**t, "id": "X"} if "id" in t else t for t in delta["tool_calls"]
            ]
            choice["delta"] = delta
        choices.append(choice)
    out["choices"] = choices
    return out


def comparable(response: dict[str, Any], chat: bool) -> list[dict[str, Any]]:
    """Per choice: the message (or text) without null/empty fields, plus finish_reason."""
    out = []
    for choice in sorted(response["choices"], key=lambda c: c["index"]):
        if chat:
            body = {k: v for k, v in choice["message"].items() if v is not None and v != []}
            body["tool_calls"] = [{**t, "id": "X"} for t in body.get("tool_calls", [])]
        else:
            body = {"text": choice["text"]}
        body["finish_reason"] = choice["finish_reason"]
        body["stop_reason"] = choice.get("stop_reason")
        out.append(body)
    return out


def tokens(usage: dict[str, Any]) -> tuple[int, int, int]:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


async def run_scenario(
    server: FakeVLLMServer,
    tmp_path: Path,
    *,
    chat: bool = True,
    payload: Any = "Hello there, how are you today?",
    **params: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stream through the client and check it against raw httpx and the non-streaming answer."""
    key, path = ("messages", "chat/completions") if chat else ("prompt", "completions")
    if chat and isinstance(payload, str):
        payload = [{"role": "user", "content": payload}]
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    got: list[dict[str, Any]] = []
    headers = {"X-Request-Id": "fixed-id"}
    call = client.chat_completion if chat else client.completions
    async with await call(payload, stream=True, headers=headers, **params) as stream:  # type: ignore[operator]
        async for chunk in stream:
            got.append(chunk)
    plain = await call(
        payload, headers=headers, **{k: v for k, v in params.items() if k != "stream_options"}
    )  # type: ignore[operator]
    await client.close()

    body = {key: payload, "stream": True, "request_id": "fixed-id", **params}
    expected = await raw_stream(server, path, body)
    assert [normalize_chunk(c) for c in got] == [normalize_chunk(c) for c in expected]

    records = [r.to_dict() for r in load_logs(tmp_path)]
    assert len(records) == 2
    record = next(r for r in records if r["stream"])
    assert record["stream_end"] == "completed"
    assert record["error"] is None
    assert record["chunks"] >= len(got)
    assert record["client_request_id"] == "fixed-id"
    assert record["parameters"] == {"stream": True, **params}
    response = record["response"]
    assert comparable(response, chat) == comparable(plain, chat)
    assert response["id"] == plain["id"]
    assert tokens(record["usage"]) == tokens(plain["usage"])
    assert record["ttft_ms"] is not None and record["ttft_ms"] <= record["latency_ms"]
    return got, record


async def test_text_reply(server: FakeVLLMServer, tmp_path: Path) -> None:
    got, record = await run_scenario(server, tmp_path)
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"] for c in got), "the injected usage chunk must be hidden"
    assert record["response"]["choices"][0]["message"]["content"].startswith("Echo: Hello")


@pytest.mark.parametrize("merged", [False, True])
async def test_tool_call_deltas(server: FakeVLLMServer, tmp_path: Path, merged: bool) -> None:
    server.merge_tool_name_delta = merged
    got, record = await run_scenario(
        server, tmp_path, payload="What is the weather in Paris?", tools=[WEATHER_TOOL]
    )
    first_tool = next(c for c in got if c["choices"][0]["delta"].get("tool_calls"))
    assert len(first_tool["choices"][0]["delta"]["tool_calls"]) == (2 if merged else 1)
    message = record["response"]["choices"][0]["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}
    assert record["response"]["choices"][0]["finish_reason"] == "tool_calls"


async def test_reasoning(server: FakeVLLMServer, tmp_path: Path) -> None:
    server.reasoning = True
    _, record = await run_scenario(server, tmp_path)
    message = record["response"]["choices"][0]["message"]
    key = "reasoning" if server.flavor == "v0.33" else "reasoning_content"
    assert message[key] == "Let me think about this request."


async def test_n_choices_interleaved(server: FakeVLLMServer, tmp_path: Path) -> None:
    got, record = await run_scenario(server, tmp_path, n=3, max_tokens=5)
    indexes = [c["choices"][0]["index"] for c in got]
    assert indexes[:3] == [0, 1, 2]
    choices = record["response"]["choices"]
    assert [c["finish_reason"] for c in choices] == ["length"] * 3


async def test_caller_asked_for_usage(server: FakeVLLMServer, tmp_path: Path) -> None:
    got, record = await run_scenario(server, tmp_path, stream_options={"include_usage": True})
    assert got[-1]["choices"] == [] and got[-1]["usage"] == record["usage"]


async def test_continuous_usage_stats(server: FakeVLLMServer, tmp_path: Path) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    got, _ = await run_scenario(server, tmp_path, stream_options=options)
    assert all("usage" in c for c in got)
    assert got[0]["usage"]["completion_tokens"] == 0


def strict(response: dict[str, Any], chat: bool) -> dict[str, Any]:
    """What a stream's record must share with the non-streaming body, nulls included."""
    choices = []
    for choice in sorted(response["choices"], key=lambda c: c["index"]):
        out = {k: choice.get(k) for k in ("finish_reason", "stop_reason", "logprobs")}
        out["token_ids"] = choice.get("token_ids")
        if chat:
            message = dict(choice["message"])
            message["tool_calls"] = [{**t, "id": "X"} for t in message.get("tool_calls") or []]
            message = {k: v for k, v in message.items() if k in ("content", "role")} | {
                "tool_calls": message["tool_calls"],
                "has_tool_calls_key": "tool_calls" in choice["message"],
            }
            out["message"] = message
        else:
            out["text"] = choice["text"]
            out["prompt_token_ids"] = choice.get("prompt_token_ids")
        choices.append(out)
    top = {k: response.get(k) for k in ("id", "model", "kv_transfer_params", "system_fingerprint")}
    if chat:
        top["prompt_token_ids"] = response.get("prompt_token_ids")
        top["prompt_text"] = response.get("prompt_text")
    return {"choices": choices, **top}


NAMED = {"type": "function", "function": {"name": "get_weather"}}
SCENARIOS: dict[str, tuple[bool, dict[str, Any]]] = {
    "named_tool": (True, {"tools": [WEATHER_TOOL], "tool_choice": NAMED}),
    "required_tool": (True, {"tools": [WEATHER_TOOL], "tool_choice": "required"}),
    "auto_tool": (True, {"tools": [WEATHER_TOOL]}),
    "length_cut": (True, {"max_tokens": 3}),
    "chat_logprobs": (True, {"logprobs": True, "top_logprobs": 2}),
    "chat_token_ids": (True, {"return_token_ids": True, "return_prompt_text": True}),
    "stop_string": (True, {"stop": ["weather"]}),
    "stop_token": (True, {"stop_token_ids": [7]}),
    "kv_transfer": (True, {"kv_transfer_params": {"do_remote_decode": True}}),
    "text_logprobs": (False, {"logprobs": 2, "max_tokens": 6}),
    "text_echo_ids": (False, {"echo": True, "return_token_ids": True, "logprobs": 1}),
    "text_stop": (False, {"stop": "weather"}),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_stream_record_equals_the_body(
    server: FakeVLLMServer, tmp_path: Path, name: str
) -> None:
    server.prompt_tokens_details = True
    chat, params = SCENARIOS[name]
    payload = "What is the weather in Paris?"
    _, record = await run_scenario(server, tmp_path, chat=chat, payload=payload, **params)
    plain = next(r for r in load_logs(tmp_path) if not r["stream"])["response"]
    if name == "kv_transfer" and server.flavor == "v0.10.2":
        plain["kv_transfer_params"] = None  # v0.10.2's stream chunks had no such field
    assert strict(record["response"], chat) == strict(plain, chat)
    assert record["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


USAGE_OFF = [
    {"include_usage": False},
    {"continuous_usage_stats": True},
    {"include_usage": False, "continuous_usage_stats": True},
]


@pytest.mark.parametrize("options", USAGE_OFF)
@pytest.mark.parametrize("chat", [True, False])
async def test_usage_recorded_when_the_caller_turned_it_off(
    server: FakeVLLMServer, tmp_path: Path, options: dict[str, Any], chat: bool
) -> None:
    if server.flavor == "v0.10.2" and "include_usage" not in options:
        # v0.10.2 defaulted include_usage to true inside stream_options; the middleware hides
        # usage as v0.33 and the OpenAI API do when the caller did not set it.
        pytest.skip("v0.10.2 sends usage for this option by itself")
    # run_scenario checks the caller's chunks against what the server sends for the caller's
    # own options (no usage chunk, no running usage), and the record's usage against the
    # non-streaming answer.
    got, record = await run_scenario(server, tmp_path, chat=chat, stream_options=options)
    assert all(c["choices"] and "usage" not in c for c in got)
    assert record["usage"] is not None and record["response"]["usage"] == record["usage"]
    sent = server.requests[-3].body  # the middleware's stream, before the plain call and httpx
    assert sent["stream_options"] == {**options, "include_usage": True}


async def test_keep_alive_comments(server: FakeVLLMServer, tmp_path: Path) -> None:
    server.keepalive_interval = 0.01
    server.token_delay = 0.02
    await run_scenario(server, tmp_path, max_tokens=4)


async def test_completions(server: FakeVLLMServer, tmp_path: Path) -> None:
    _, record = await run_scenario(server, tmp_path, chat=False, max_tokens=8)
    assert record["response"]["object"] == "text_completion"
    assert record["response"]["choices"][0]["text"].startswith("Echo: ")


async def test_completions_several_prompts_and_n(server: FakeVLLMServer, tmp_path: Path) -> None:
    _, record = await run_scenario(
        server, tmp_path, chat=False, payload=["one two three", "four five"], n=2
    )
    assert [c["index"] for c in record["response"]["choices"]] == [0, 1, 2, 3]


async def test_chunks_arrive_before_the_stream_ends(tmp_path: Path) -> None:
    with FakeVLLMServer(token_delay=0.1) as server:
        client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
        started = time.perf_counter()
        arrivals = []
        stream = await client.chat_completion(
            [{"role": "user", "content": "one two three four five"}], stream=True
        )
        async with stream:
            async for _ in stream:
                arrivals.append(time.perf_counter() - started)
        await client.close()
    assert arrivals[-1] - arrivals[1] > 0.3  # content chunks were spread out, not batched


async def test_slow_first_token(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    stream = await client.chat_completion(
        [{"role": "user", "content": "hi [[slow:0.3]]"}], stream=True
    )
    async with stream:
        chunks = [chunk async for chunk in stream]
    await client.close()
    (record,) = load_logs(tmp_path)
    assert chunks and record["ttft_ms"] >= 300
    assert record["latency_ms"] >= record["ttft_ms"]


@pytest.mark.parametrize("shape", ["nested", "flat"])
async def test_midstream_error(server: FakeVLLMServer, tmp_path: Path, shape: str) -> None:
    server.error_shape = shape  # type: ignore[assignment]
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    messages = [{"role": "user", "content": "one two three four [[midstream_error]]"}]
    got: list[dict[str, Any]] = []
    stream = await client.chat_completion(messages, stream=True, headers={"x-request-id": "e1"})
    with pytest.raises(APIStatusError) as caught:
        async with stream:
            async for chunk in stream:
                got.append(chunk)
    await client.close()
    expected = await raw_stream(
        server, "chat/completions", {"messages": messages, "stream": True, "request_id": "e1"}
    )
    assert "error" in expected[-1]
    assert [normalize_chunk(c) for c in got] == [normalize_chunk(c) for c in expected[:-1]]
    error = caught.value
    inner = expected[-1]["error"]
    assert error.in_stream and error.status_code == inner["code"]
    assert error.error_type == inner["type"] and error.message == inner["message"]
    assert error.param is None
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "error_event"
    assert record["error_detail"]["status_code"] == inner["code"]
    assert record["status_code"] == 200
    assert record["response"]["choices"][0]["message"]["content"].startswith("Echo:")


async def test_dropped_connection(server: FakeVLLMServer, tmp_path: Path) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    stream = await client.chat_completion(
        [{"role": "user", "content": "one two three four [[drop]]"}], stream=True
    )
    got = []
    with pytest.raises(APIConnectionError):
        async for chunk in stream:
            got.append(chunk)
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "disconnected"
    assert record["chunks"] == len(got) > 0
    assert record["response"]["choices"][0]["message"]["content"].startswith("Echo:")


@pytest.mark.parametrize("status", [400, 503])
async def test_http_error_before_the_stream_has_stream_end(
    server: FakeVLLMServer, tmp_path: Path, status: int
) -> None:
    client = VLLMMiddleware(server.base_url, log_dir=tmp_path, redis_url="")
    with pytest.raises(APIStatusError):
        await client.chat_completion(
            [{"role": "user", "content": f"hi [[status:{status}]]"}], stream=True
        )
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream"] and record["status_code"] == status
    assert record["stream_end"] == "http_error" and record["chunks"] == 0


async def test_unreachable_server_stream_has_stream_end(tmp_path: Path) -> None:
    with FakeVLLMServer() as server:
        url = server.base_url
    client = VLLMMiddleware(url, log_dir=tmp_path, redis_url="")
    with pytest.raises(APIConnectionError):
        await client.chat_completion([{"role": "user", "content": "hi"}], stream=True)
    await client.close()
    (record,) = load_logs(tmp_path)
    assert record["stream_end"] == "disconnected" and record["chunks"] == 0


def test_sse_decoder_framing() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "", "event: x", "id: 3", 'data: {"a":', "data:1}", "", "data"]
    body = "\n".join(lines).encode()
    events = decoder.feed(body[:20]) + decoder.feed(body[20:])
    assert events == [b'{"a":\n1}']
    assert decoder.close() == [b""]


async def test_crlf_and_multiline_data(tmp_path: Path) -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    first = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]}
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    text = orjson.dumps(first).decode()
    body = (
        ": keep-alive\r\n\r\n"
        f"data: {text[:10]}\r\ndata: {text[10:]}\r\n\r\n"
        f"data: {orjson.dumps(last).decode()}\r\n\r\ndata: [DONE]\r\n\r\n"
    ).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x/v1")
    client = VLLMMiddleware("http://x/v1", log_dir=tmp_path, redis_url="", http_client=http)
    stream = await client.chat_completion([{"role": "user", "content": "hi"}], stream=True)
    got = [c async for c in stream]
    await client.close()
    await http.aclose()
    # The newline joining the two data lines is JSON whitespace inside the object.
    assert got == [first, last]
    (record,) = load_logs(tmp_path)
    assert record["response"]["choices"][0]["message"] == {"role": "assistant", "content": "a"}


def sse_chunks(*contents: str, finish: str = "stop") -> list[dict[str, Any]]:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{**head, "choices": [{"index": 0, "delta": {"content": c}}]} for c in contents]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return chunks


async def stream_through(
    tmp_path: Path, parts: Sequence[bytes | float], headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], Any]:
    """Stream a canned body (bytes, with float pauses between them) through the middleware."""

    async def body() -> Any:
        for part in parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
            else:
                yield part

    def handler(request: httpx.Request) -> httpx.Response:
        sent = {"content-type": "text/event-stream", **(headers or {})}
        return httpx.Response(200, content=body(), headers=sent)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x/v1")
    client = VLLMMiddleware("http://x/v1", log_dir=tmp_path, redis_url="", http_client=http)
    stream = await client.chat_completion(
        [{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": False}
    )
    async with stream:
        got = [c async for c in stream]
    await client.close()
    await http.aclose()
    (record,) = load_logs(tmp_path)
    return got, record


def frames(chunks: list[dict[str, Any]], end: bytes = b"\n\n") -> list[bytes]:
    return [b"data: " + orjson.dumps(c) + end for c in chunks] + [b"data: [DONE]" + end]


async def test_unicode_line_separators_inside_json(tmp_path: Path) -> None:
    # orjson, serde_json and pydantic write U+2028/U+2029/U+0085 raw; only CR and LF end an
    # SSE line (httpx's aiter_lines would split there and break the JSON).
    text = "a\u2028b\u2029c\x85d"
    chunks = sse_chunks(text)
    got, record = await stream_through(tmp_path, frames(chunks))
    assert got == chunks
    assert record["stream_end"] == "completed"
    assert record["response"]["choices"][0]["message"]["content"] == text


async def test_events_split_and_batched_across_body_chunks(tmp_path: Path) -> None:
    chunks = sse_chunks("one", "two", "three")
    body = b"".join(frames(chunks, end=b"\r\n\r\n"))
    parts: list[bytes | float] = [body[i : i + 7] for i in range(0, len(body), 7)]
    got, record = await stream_through(tmp_path, parts)
    assert got == chunks and record["chunks"] == len(chunks)
    got, record = await stream_through(tmp_path / "one", [body])
    assert got == chunks and record["stream_end"] == "completed"


async def test_declared_charset_and_invalid_utf8(tmp_path: Path) -> None:
    chunks = sse_chunks("caf\u00e9")
    latin = [part.decode().encode("latin-1") for part in frames(chunks)]
    headers = {"content-type": "text/event-stream; charset=latin-1"}
    got, _ = await stream_through(tmp_path, latin, headers)
    assert got == chunks
    # Invalid UTF-8 is replaced, as httpx's text decoding does, rather than failing the stream.
    broken = frames(chunks)
    broken[1] = broken[1].replace(b"caf\xc3\xa9", b"caf\xe9")
    got, record = await stream_through(tmp_path / "bad", broken)
    assert got[1]["choices"][0]["delta"]["content"] == "caf\ufffd"
    assert record["stream_end"] == "completed"


async def test_compressed_body(tmp_path: Path) -> None:
    chunks = sse_chunks("zipped")
    body = gzip.compress(b"".join(frames(chunks)))
    got, record = await stream_through(tmp_path, [body], {"content-encoding": "gzip"})
    assert got == chunks and record["stream_end"] == "completed"


async def test_end_of_body_after_done_arrives_later(tmp_path: Path) -> None:
    chunks = sse_chunks("late", "end")
    parts: list[bytes | float] = [*frames(chunks), 0.05, b": trailing comment\n\n"]
    got, record = await stream_through(tmp_path, parts)
    assert got == chunks and record["stream_end"] == "completed"


async def test_server_keeping_the_stream_open_after_done_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "_DRAIN_TIMEOUT", 0.1)
    chunks = sse_chunks("open")
    started = time.perf_counter()
    got, record = await stream_through(tmp_path, [*frames(chunks), 30.0])
    assert time.perf_counter() - started < 5
    assert got == chunks and record["stream_end"] == "completed"
