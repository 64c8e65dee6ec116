"""Conformance against vLLM 0.33.0's own pydantic protocol models (optional).

Skipped unless vLLM's protocol package imports: `scripts/conformance.sh` builds that
environment (`.venv-vllm`) and runs this module. For both wire flavours of the fake it
validates every fake body and chunk against vLLM's Response/StreamResponse models, every
request the middleware sends against the Request models, every record's `response` against the
non-streaming Response model, and every reassembled stream against the same request sent
without streaming. The counts per model are printed at the end (run with `-s`).
"""

from __future__ import annotations

import collections
import copy
import json
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
completion_protocol = pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
embed_protocol = pytest.importorskip("vllm.entrypoints.pooling.embed.protocol")
scoring_protocol = pytest.importorskip("vllm.entrypoints.pooling.scoring.protocol")
tokenize_protocol = pytest.importorskip("vllm.entrypoints.serve.tokenize.protocol")
responses_protocol = pytest.importorskip("vllm.entrypoints.openai.responses.protocol")
transcription_protocol = pytest.importorskip(
    "vllm.entrypoints.speech_to_text.transcription.protocol"
)

from pydantic import TypeAdapter  # noqa: E402 - only after the skip
from vllm_middleware import VLLMMiddleware, load_logs  # noqa: E402
from vllm_middleware_testing import FakeVLLMServer  # noqa: E402

COUNTS: collections.Counter[str] = collections.Counter()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
USAGE = {"include_usage": True}
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}

CHAT: dict[str, dict[str, Any]] = {
    "plain": {},
    "length": {"max_tokens": 3},
    "n3": {"n": 3, "max_tokens": 4},
    "usage": {"stream_options": USAGE},
    "continuous": {"stream_options": CONTINUOUS},
    "usage_off": {"stream_options": {"include_usage": False}},
    "continuous_only": {"stream_options": {"continuous_usage_stats": True}},
    "auto_tool": {"tools": [WEATHER]},
    "named_tool": {"tools": [WEATHER], "tool_choice": NAMED},
    "required_tool": {"tools": [WEATHER], "tool_choice": "required"},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "token_ids": {"return_token_ids": True, "return_prompt_text": True},
    "stop": {"stop": ["weather"]},
    "stop_token": {"stop_token_ids": [7]},
    "kv": {"kv_transfer_params": {"do_remote_decode": True}},
    "echo": {"echo": True},
    "extras": {"top_k": 20, "min_p": 0.1, "seed": 3, "chat_template_kwargs": {"x": 1}},
}
COMPLETIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "n2_prompts": {"n": 2, "max_tokens": 5},
    "usage": {"stream_options": USAGE},
    "continuous": {"stream_options": CONTINUOUS},
    "usage_off": {"stream_options": {"include_usage": False}},
    "logprobs": {"logprobs": 2},
    "echo": {"echo": True, "return_token_ids": True},
    "stop": {"stop": "weather"},
    "kv": {"kv_transfer_params": {"do_remote_decode": True}},
}
NOT_STREAMED = {"prompt_logprobs": 1}  # vLLM rejects prompt_logprobs on a stream


def validate(model: Any, data: Any) -> Any:
    name = getattr(model, "__name__", None) or str(model)
    adapter = model if isinstance(model, TypeAdapter) else None
    result = adapter.validate_python(data) if adapter else model.model_validate(copy.deepcopy(data))
    COUNTS[name] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\nvLLM 0.33.0 models validated:")
    for name, count in sorted(COUNTS.items()):
        print(f"  {name:40s} {count:6d}")


@pytest.fixture(params=["v0.33", "v0.10.2"], scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[FakeVLLMServer]:
    with FakeVLLMServer(flavor=request.param, prompt_tokens_details=True) as fake:
        yield fake


def sse(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            events.append(json.loads("\n".join(data)))
    return events


def comparable(response: Any) -> Any:
    """A validated response's choices without what two runs of the same request may differ
    in (tool-call ids), and its token counts."""
    dumped = response.model_dump()
    for choice in dumped["choices"]:
        message = choice.get("message")
        if message is not None:
            # An extra field (v0.10.2's reasoning_content) that is null says nothing.
            fields = protocol.ChatMessage.model_fields
            choice["message"] = message = {
                k: v for k, v in message.items() if v is not None or k in fields
            }
        for call in (message or {}).get("tool_calls") or []:
            call["id"] = "X"
    usage = dumped.get("usage") or {}
    counts = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"choices": dumped["choices"], "usage": counts, "id": dumped["id"]}


async def run(server: FakeVLLMServer, chat: bool, name: str, params: dict[str, Any]) -> None:
    key, path = ("messages", "chat/completions") if chat else ("prompt", "completions")
    payload: Any = "What is the weather in Paris?"
    if chat:
        last = "assistant" if name == "echo" else "user"
        payload = [{"role": "user", "content": payload}]
        if last == "assistant":
            payload.append({"role": "assistant", "content": "It is"})
    elif name == "n2_prompts":
        payload = ["first prompt here", "second one"]
    response_model = (
        protocol.ChatCompletionResponse if chat else completion_protocol.CompletionResponse
    )
    chunk_model = (
        protocol.ChatCompletionStreamResponse
        if chat
        else completion_protocol.CompletionStreamResponse
    )
    request_model = (
        protocol.ChatCompletionRequest if chat else completion_protocol.CompletionRequest
    )
    headers = {"X-Request-Id": f"conf-{name}"}
    plain_params = {k: v for k, v in params.items() if k != "stream_options"}
    with tempfile.TemporaryDirectory() as log_dir:
        server.clear_requests()
        client = VLLMMiddleware(server.base_url, log_dir=log_dir, redis_url="")
        call = client.chat_completion if chat else client.completions
        async with await call(payload, stream=True, headers=headers, **params) as stream:  # type: ignore[operator]
            async for _ in stream:
                pass
        await call(payload, headers=headers, **plain_params, **NOT_STREAMED)  # type: ignore[operator]
        await client.close()
        # Every request the middleware sent is one vLLM accepts.
        for sent in server.requests:
            validate(request_model, sent.body)
        records = load_logs(log_dir)
        assert len(records) == 2 and all(r["error"] is None for r in records)
        streamed = next(r for r in records if r["stream"])
        plain = next(r for r in records if not r["stream"])
        assert streamed["usage"] is not None
        as_streamed = validate(response_model, streamed["response"])
        as_plain = validate(response_model, plain["response"])
        expected = comparable(as_plain)
        got = comparable(as_streamed)
        if not chat:
            # Prompt logprobs are rejected on streams: only the plain answer has them.
            for choice in expected["choices"]:
                choice["prompt_logprobs"] = None
        assert got == expected
    # The fake's own wire: the bodies and chunks it sends for the caller's request.
    body = {key: payload, **params, "stream": True}
    async with httpx.AsyncClient() as http:
        raw = await http.post(f"{server.base_url}/{path}", json=body)
        plain_raw = await http.post(
            f"{server.base_url}/{path}", json={key: payload, **plain_params, **NOT_STREAMED}
        )
    for chunk in sse(raw.text):
        validate(chunk_model, chunk)
    validate(response_model, plain_raw.json())


@pytest.mark.parametrize("name", sorted(CHAT))
async def test_chat(server: FakeVLLMServer, name: str) -> None:
    server.reasoning = False
    await run(server, True, name, CHAT[name])


@pytest.mark.parametrize("name", ["plain", "continuous", "named_tool", "n3"])
async def test_chat_with_reasoning_parser(server: FakeVLLMServer, name: str) -> None:
    server.reasoning = True
    try:
        await run(server, True, name, CHAT[name])
    finally:
        server.reasoning = False


@pytest.mark.parametrize("name", sorted(COMPLETIONS))
async def test_completions(server: FakeVLLMServer, name: str) -> None:
    await run(server, False, name, COMPLETIONS[name])


async def test_errors_are_vllm_error_responses(server: FakeVLLMServer) -> None:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    bad = [
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream_options": USAGE},
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"},
        ),
        ("completions", {"prompt": ""}),
        ("completions", {"prompt": "x", "model": "nope"}),
    ]
    async with httpx.AsyncClient() as http:
        for path, body in bad:
            answer = await http.post(f"{server.base_url}/{path}", json=body)
            assert answer.status_code in (400, 404)
            validate(ErrorResponse, answer.json())


async def test_other_endpoints(server: FakeVLLMServer) -> None:
    with tempfile.TemporaryDirectory() as log_dir:
        server.clear_requests()
        client = VLLMMiddleware(server.base_url, log_dir=log_dir, redis_url="")
        await client.embeddings(["a b", "c"], store_embeddings=True)
        await client.embeddings("a b", encoding_format="base64", store_embeddings=True)
        await client.rerank("q", ["d1", "d2"], top_n=1)
        await client.score("q", ["d1", "d2"])
        tokens = await client.tokenize("one two")
        await client.tokenize(messages=[{"role": "user", "content": "hi"}])
        await client.detokenize(tokens["tokens"])
        await client.responses("Hello there", instructions="Be brief.")
        stream = await client.responses("Hello there", stream=True)
        async with stream:
            events = [event async for event in stream]
        await client.audio.transcriptions(("a.wav", b"RIFF" + b"\0" * 100), language="en")
        await client.close()
        requests = {
            "/v1/embeddings": embed_protocol.EmbeddingCompletionRequest,
            "/v1/rerank": scoring_protocol.RerankRequest,
            "/v1/score": scoring_protocol.ScoreQueriesDocumentsRequest,
            "/detokenize": tokenize_protocol.DetokenizeRequest,
            "/v1/responses": responses_protocol.ResponsesRequest,
        }
        for sent in server.requests:
            if sent.path == "/tokenize":
                model = (
                    tokenize_protocol.TokenizeChatRequest
                    if "messages" in sent.body
                    else tokenize_protocol.TokenizeCompletionRequest
                )
                validate(model, sent.body)
            elif sent.path in requests:
                validate(requests[sent.path], sent.body)
        answers = {
            "embeddings": embed_protocol.EmbeddingResponse,
            "rerank": scoring_protocol.RerankResponse,
            "score": scoring_protocol.ScoreResponse,
            "tokenize": tokenize_protocol.TokenizeResponse,
            "detokenize": tokenize_protocol.DetokenizeResponse,
            "responses": responses_protocol.ResponsesResponse,
            "audio/transcriptions": transcription_protocol.TranscriptionResponse,
        }
        records = load_logs(log_dir)
        assert len(records) == 10
        for record in records:
            validate(answers[record["endpoint"]], record["response"])
    # vLLM's union leaves out the text events, which it builds from the openai SDK's types
    # (responses/streaming_events.py).
    from openai.types.responses import ResponseStreamEvent

    vllm_events = TypeAdapter(responses_protocol.StreamingResponsesResponse)
    sdk_events: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for event in events:
        if event["type"].startswith("response.output_text."):
            sdk_events.validate_python(event)
            COUNTS["openai ResponseStreamEvent"] += 1
        else:
            vllm_events.validate_python(event)
            COUNTS["StreamingResponsesResponse"] += 1
