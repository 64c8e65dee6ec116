"""`vllm-mw export`: fine-tuning sets validated with the `openai` SDK's types; OTLP/JSON spans.

Records with media are finished off the event loop, so they may land in the file after later
calls: the tests pick examples by content, never by position.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from pydantic import TypeAdapter
from vllm_middleware import VLLMMiddleware
from vllm_middleware._cli import main
from vllm_middleware._export import _WRITE_BYTES, ExportOptions, export
from vllm_middleware._otlp import SEMCONV_VERSION
from vllm_middleware._record_view import RecordFilter
from vllm_middleware_testing import FakeVLLMServer

MODEL = "vllm:qwen-2.5-omni-7b"
IMAGE = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20).decode()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

_BY_ROLE: dict[str, Any] = {
    "system": ChatCompletionSystemMessageParam,
    "user": ChatCompletionUserMessageParam,
    "assistant": ChatCompletionAssistantMessageParam,
    "tool": ChatCompletionToolMessageParam,
}


def check_chat_example(example: dict[str, Any]) -> None:
    """One line of an OpenAI chat fine-tuning file, checked against the SDK's own types."""
    assert set(example) <= {"messages", "tools", "parallel_tool_calls"}
    messages = example["messages"]
    assert messages and messages[-1]["role"] == "assistant"
    assert any(m["role"] == "user" for m in messages)
    for message in messages:
        kind = _BY_ROLE[message["role"]]
        TypeAdapter(kind).validate_python(message, strict=True)
        # TypedDicts accept unknown keys: check them against the type's own keys as well.
        assert set(message) <= set(kind.__annotations__), message
    for tool in example.get("tools", []):
        TypeAdapter(ChatCompletionFunctionToolParam).validate_python(tool, strict=True)


async def make_traffic(base_url: str, log_dir: Path) -> None:
    """Real calls through the middleware: chat, tools and their results, an image, a completion,
    a repeated conversation and a failed call."""
    async with VLLMMiddleware(
        base_url=base_url, log_dir=log_dir, host="app-7", metadata={"app": "app-7"}
    ) as client:
        system = {"role": "system", "content": "Be brief."}
        await client.chat_completion([system, {"role": "user", "content": "Hello"}], model=MODEL)
        await client.chat_completion([system, {"role": "user", "content": "Hello"}], model=MODEL)
        asked = [{"role": "user", "content": "Weather in Paris?"}]
        reply = await client.chat_completion(asked, model=MODEL, tools=[WEATHER])
        call = reply["choices"][0]["message"]["tool_calls"][0]
        follow_up = [
            *asked,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'},
        ]
        await client.chat_completion(follow_up, model=MODEL, tools=[WEATHER])
        picture = [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}},
        ]
        await client.chat_completion([{"role": "user", "content": picture}], model=MODEL)
        await client.completions(prompt="Once upon a time", model=MODEL, max_tokens=8)
        with pytest.raises(Exception):  # noqa: B017 - any failure: it is logged as a record
            await client.chat_completion([{"role": "user", "content": "x"}], model="no-such")


@pytest.fixture
def traffic(fake_vllm: FakeVLLMServer, tmp_path: Path) -> Path:
    log_dir = tmp_path / "logs"
    asyncio.run(make_traffic(fake_vllm.base_url, log_dir))
    return log_dir


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def first_text(example: dict[str, Any]) -> str:
    """The first user turn's text of a chat or ShareGPT example."""
    for turn in example.get("messages") or example.get("conversations") or []:
        if turn.get("role") == "user" or turn.get("from") == "human":
            content = turn.get("content", turn.get("value"))
            return content if isinstance(content, str) else content[0]["text"]
    return ""


def pick(examples: list[dict[str, Any]], text: str, nth: int = 0) -> dict[str, Any]:
    return [e for e in examples if first_text(e) == text][nth]


def by_text(examples: list[dict[str, Any]]) -> list[str]:
    return sorted(first_text(e) for e in examples)


def test_openai_chat_examples_are_valid_and_complete(traffic: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    result = export(traffic, out, "openai-chat", RecordFilter(exclude_errors=True))
    examples = read_lines(out)
    assert result.written == len(examples) == 5  # 5 chats; the completion and failure skipped
    assert result.skipped == {"no messages (a completions or metadata-only record)": 1}
    for example in examples:
        check_chat_example(example)
    first = pick(examples, "Hello")["messages"]
    assert first[0] == {"role": "system", "content": "Be brief."}
    assert first[1] == {"role": "user", "content": "Hello"}
    assert first[2]["role"] == "assistant" and first[2]["content"]
    tool_call, tool_result = (e for e in examples if first_text(e) == "Weather in Paris?")
    assert tool_call["tools"] == [WEATHER]
    assert tool_call["messages"][-1]["tool_calls"][0]["function"]["name"] == "get_weather"
    roles = [m["role"] for m in tool_result["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    # The image is restored from the media store into the example, as the user sent it.
    image_part = pick(examples, "What is in this picture?")["messages"][0]["content"][1]
    assert image_part["image_url"]["url"] == f"data:image/png;base64,{IMAGE}"


def test_media_dropped_dedupe_and_errors(traffic: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    options = ExportOptions(media="drop", dedupe=True)
    result = export(traffic, out, "openai-chat", RecordFilter(exclude_errors=True), options)
    examples = read_lines(out)
    assert result.skipped["duplicate conversation"] == 1  # "Hello" was asked twice
    assert len(examples) == 4
    assert pick(examples, "What is in this picture?")["messages"][0]["content"] == [
        {"type": "text", "text": "What is in this picture?"}
    ]
    for example in examples:
        check_chat_example(example)
    # Errors are excluded by default on the command line; --include-errors lets them try
    # (a failed call has no answer, so it still makes no example, but is counted as such).
    args = ["export", "--log-dir", str(traffic), "--format", "openai-chat", "--json"]
    assert main([*args, "--out", str(out), "--include-errors"]) == 0
    assert len(read_lines(out)) == 5


def test_filters_by_model_metadata_and_finish_reason(traffic: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    export(traffic, out, "openai-chat", RecordFilter(meta={"app": "app-8"}))
    assert out.read_text() == ""
    export(traffic, out, "openai-chat", RecordFilter(finish_reason="tool_calls"))
    (only,) = read_lines(out)
    assert only["messages"][-1]["tool_calls"]


def test_completions_and_sharegpt(traffic: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    export(traffic, out, "openai-completions", RecordFilter(exclude_errors=True))
    (pair,) = read_lines(out)
    assert pair["prompt"] == "Once upon a time" and isinstance(pair["completion"], str)
    export(traffic, out, "sharegpt", RecordFilter(exclude_errors=True))
    convs = read_lines(out)
    hello = pick(convs, "Hello")
    assert hello["system"] == "Be brief."
    assert [t["from"] for t in hello["conversations"]] == ["human", "gpt"]
    call, result = (c for c in convs if first_text(c) == "Weather in Paris?")
    assert [t["from"] for t in call["conversations"]] == ["human", "function_call"]
    assert json.loads(call["conversations"][1]["value"])["name"] == "get_weather"
    assert json.loads(call["tools"]) == [WEATHER]
    assert [t["from"] for t in result["conversations"]] == [
        "human",
        "function_call",
        "observation",
        "gpt",
    ]


def test_metadata_only_and_redacted_records_are_skipped_not_fatal(tmp_path: Path) -> None:
    part = tmp_path / "date=2025-10-21" / "host=a" / "w.jsonl"
    part.parent.mkdir(parents=True)
    records = [
        {"timestamp": "2025-10-21T10:00:00+00:00", "request_id": "r1", "model": "m"},
        {
            "timestamp": "2025-10-21T10:00:01+00:00",
            "request_id": "r2",
            "messages": [{"role": "user", "content": "[REDACTED]"}],
            "response": {"choices": [{"message": {"role": "assistant", "content": None}}]},
        },
    ]
    part.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    out = tmp_path / "o.jsonl"
    result = export(tmp_path, out, "openai-chat", RecordFilter())
    assert result.written == 0 and sum(result.skipped.values()) == 2
    export(tmp_path, out, "otlp-json", RecordFilter())
    (doc,) = read_lines(out)
    assert len(doc["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 2


def attrs_of(span: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for attr in span["attributes"]:
        ((kind, value),) = attr["value"].items()
        if kind == "arrayValue":
            value = [next(iter(v.values())) for v in value["values"]]
        out[attr["key"]] = value
    return out


def test_otlp_json_spans_follow_the_genai_conventions(traffic: Path, tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    options = ExportOptions(server_address="vllm.internal:8000")
    result = export(traffic, out, "otlp-json", RecordFilter(), options)
    (doc,) = read_lines(out)
    (resource,) = doc["resourceSpans"]
    assert {"key": "host.name", "value": {"stringValue": "app-7"}} in resource["resource"][
        "attributes"
    ]
    (scope,) = resource["scopeSpans"]
    assert scope["schemaUrl"].endswith(SEMCONV_VERSION)
    spans = scope["spans"]
    assert result.written == len(spans) == 7  # errors included: they are spans too
    names = sorted(s["name"] for s in spans)
    assert names == ["chat no-such"] + [f"chat {MODEL}"] * 5 + [f"text_completion {MODEL}"]
    chat = spans[0]  # "Hello": records without media keep the order of the calls
    assert chat["name"] == f"chat {MODEL}" and chat["kind"] == 3
    assert len(chat["traceId"]) == 32 and len(chat["spanId"]) == 16
    assert int(chat["endTimeUnixNano"]) > int(chat["startTimeUnixNano"])
    attrs = attrs_of(chat)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert int(attrs["gen_ai.usage.input_tokens"]) > 0
    assert int(attrs["gen_ai.usage.output_tokens"]) > 0
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["server.address"] == "vllm.internal" and attrs["server.port"] == "8000"
    assert "gen_ai.input.messages" not in attrs  # content is opt-in
    completion = attrs_of(next(s for s in spans if s["name"].startswith("text_completion")))
    assert completion["gen_ai.request.max_tokens"] == "8"
    failed = next(s for s in spans if s["name"] == "chat no-such")
    assert failed["status"]["code"] == 2
    assert attrs_of(failed)["error.type"] == "NotFoundError"
    # The same records give the same ids: a re-export does not duplicate spans in a backend.
    export(traffic, tmp_path / "again.jsonl", "otlp-json", RecordFilter(), options)
    assert read_lines(tmp_path / "again.jsonl") == [doc]


def test_otlp_content_attributes_are_opt_in(traffic: Path, tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    export(traffic, out, "otlp-json", RecordFilter(), ExportOptions(otlp_content=True))
    spans = read_lines(out)[0]["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans_attrs = [attrs_of(s) for s in spans]
    first = spans_attrs[0]
    assert json.loads(first["gen_ai.system_instructions"]) == [
        {"type": "text", "content": "Be brief."}
    ]
    assert json.loads(first["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Hello"}]}
    ]
    output = json.loads(first["gen_ai.output.messages"])
    assert output[0]["role"] == "assistant" and output[0]["finish_reason"] == "stop"
    tool = next(a for a in spans_attrs if "tool_call" in a.get("gen_ai.output.messages", ""))
    assert json.loads(tool["gen_ai.tool.definitions"]) == [WEATHER]
    assert json.loads(tool["gen_ai.output.messages"])[0]["parts"][0]["type"] == "tool_call"


@pytest.mark.parametrize("fmt", ["openai-chat", "otlp-json"])
def test_the_progress_counter_writes_the_same_file(
    fmt: str, traffic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a terminal the lines go through the counting loop instead of `writelines`.
    plain = export(traffic, tmp_path / "plain", fmt, RecordFilter())
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    counted = export(traffic, tmp_path / "counted", fmt, RecordFilter(), progress=True)
    assert counted.written == plain.written > 0
    assert (tmp_path / "counted").read_bytes() == (tmp_path / "plain").read_bytes()


def test_a_failed_export_leaves_the_target_as_it_was(traffic: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    out.write_text("previous set\n")
    # The bad date is found when reading starts, with the output file already open.
    args = ["export", "--log-dir", str(traffic), "--format", "sharegpt", "--out", str(out)]
    assert main([*args, "--since", "2025-13-45"]) == 2
    assert out.read_text() == "previous set\n"
    assert list(tmp_path.glob(".train.jsonl*")) == []


def test_export_memory_stays_flat(tmp_path: Path) -> None:
    def tree(root: Path, n: int) -> None:
        part = root / "date=2025-10-21" / "host=a" / "w.jsonl"
        part.parent.mkdir(parents=True)
        line = {
            "timestamp": "2025-10-21T10:00:00+00:00",
            "request_id": "r",
            "model": "m",
            "messages": [{"role": "user", "content": "q" * 4000}],
            "response": {"choices": [{"message": {"role": "assistant", "content": "a" * 4000}}]},
        }
        with open(part, "wb") as handle:
            for i in range(n):
                line["request_id"] = f"r{i}"
                handle.write(orjson.dumps(line) + b"\n")

    peaks = []
    # Both trees are several times the reader's 4 MiB chunk: its buffer is the constant part.
    for n in (2_000, 6_000):
        root = tmp_path / str(n)
        tree(root, n)
        for fmt in ("openai-chat", "otlp-json"):
            tracemalloc.start()
            export(root, root / f"out-{fmt}", fmt, RecordFilter())
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    small_chat, small_otlp, big_chat, big_otlp = peaks
    # Three times the records (16 MB, then 48 MB), the same peak, give or take the output
    # buffer (flushed at about 1 MiB; a small export may never fill it).
    slack = 2 * _WRITE_BYTES
    assert big_chat < small_chat * 1.1 + slack, peaks
    assert big_otlp < small_otlp * 1.1 + slack, peaks


class _Collector:
    """A real OTLP/HTTP receiver: decodes each protobuf `ExportTraceServiceRequest` posted."""

    def __init__(self, status: int = 200) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.requests: list[Any] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    parsed = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    collector.requests.append(parsed)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_spans_sent_to_an_otlp_endpoint(traffic: Path, tmp_path: Path) -> None:
    collector = _Collector()
    try:
        args = ["export", "--log-dir", str(traffic), "--format", "otlp-json"]
        assert main([*args, "--otlp-endpoint", collector.url, "--server-address", "gpu-1"]) == 0
    finally:
        collector.close()
    spans = [
        span
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    # The same spans as the OTLP/JSON file: compare ids, names and attributes.
    export(
        traffic,
        tmp_path / "s.jsonl",
        "otlp-json",
        RecordFilter(),
        ExportOptions(server_address="gpu-1"),
    )
    expected = read_lines(tmp_path / "s.jsonl")[0]["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert [s.span_id.hex() for s in spans] == [s["spanId"] for s in expected]
    assert [s.name for s in spans] == [s["name"] for s in expected]
    first = {a.key: a.value for a in spans[0].attributes}
    assert first["gen_ai.request.model"].string_value == MODEL
    assert first["gen_ai.usage.input_tokens"].int_value > 0
    assert first["server.address"].string_value == "gpu-1"
    assert spans[0].kind == 3  # SPAN_KIND_CLIENT
    failed = next(s for s in spans if s.name == "chat no-such")
    assert failed.status.code == 2


def test_an_endpoint_refusing_spans_is_a_one_line_error(
    traffic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    collector = _Collector(status=400)
    try:
        args = ["export", "--log-dir", str(traffic), "--format", "otlp-json"]
        assert main([*args, "--otlp-endpoint", collector.url]) == 2
    finally:
        collector.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vllm-mw: export: the OTLP endpoint") and "refused" in err[-1]


def test_a_missing_otlp_exporter_names_the_extra(traffic: Path) -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from vllm_middleware._cli import main\n"
        f"sys.exit(main(['export', '--log-dir', {str(traffic)!r}, '--format', 'otlp-json', "
        "'--otlp-endpoint', 'http://127.0.0.1:9/v1/traces']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("pip install 'vllm-middleware[otlp]'")


@given(
    moment=st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    )
)
def test_span_times_are_exact_nanoseconds(moment: datetime) -> None:
    # The fast path (sliced text, cached second) agrees with datetime's own arithmetic, for
    # the writers' form and for timestamps without microseconds (another length).
    from vllm_middleware._otlp import _Clock

    exact = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    clock = _Clock()
    assert clock.nanos(moment.isoformat()) == exact
    assert clock.nanos(moment.isoformat()) == exact  # from the cached second
    assert clock.nanos(moment.replace(tzinfo=None).isoformat()) == exact  # naive: UTC


def test_otlp_output_does_not_depend_on_string_hashing(tmp_path: Path) -> None:
    # Request parameters used to be visited in a set's order, which changes with each
    # process's hash seed: the same records gave different bytes (and, with both max_tokens
    # and max_completion_tokens, a different gen_ai.request.max_tokens) from run to run.
    part = tmp_path / "logs" / "date=2025-10-21" / "host=a" / "w.jsonl"
    part.parent.mkdir(parents=True)
    names = ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed")
    params = dict(zip(names, (0.5, 0.9, 40, 10, 20, 7), strict=True))
    record = {"timestamp": "2025-10-21T10:00:00+00:00", "request_id": "r", "parameters": params}
    part.write_bytes(orjson.dumps(record) + b"\n")
    code = (
        "import sys\n"
        "from vllm_middleware._export import export\n"
        "from vllm_middleware._record_view import RecordFilter\n"
        "export(sys.argv[1], sys.argv[2], 'otlp-json', RecordFilter())"
    )
    outputs = set()
    for seed in range(3):
        out = tmp_path / f"spans-{seed}.jsonl"
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        command = [sys.executable, "-c", code, str(tmp_path / "logs"), str(out)]
        subprocess.run(command, env=env, check=True)
        outputs.add(out.read_bytes())
    assert len(outputs) == 1
    (span,) = read_lines(out)[0]["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert attrs_of(span)["gen_ai.request.max_tokens"] == "10"


@pytest.mark.parametrize(
    "calls", ["not a list", ["not a call"], [{"function": "f"}], [{"function": {"name": "f"}}]]
)
def test_sharegpt_skips_a_request_turn_with_malformed_tool_calls(
    calls: Any, tmp_path: Path
) -> None:
    # Anyone can log such a turn; the export used to stop on it with a TypeError or KeyError.
    part = tmp_path / "date=2025-10-21" / "host=a" / "w.jsonl"
    part.parent.mkdir(parents=True)
    answer = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
    records = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": calls},
            ],
            "response": answer,
        },
        {"messages": [{"role": "user", "content": "fine"}], "response": answer},
    ]
    part.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    out = tmp_path / "o.jsonl"
    result = export(tmp_path, out, "sharegpt", RecordFilter())
    assert result.written == 1 and result.skipped == {"malformed message": 1}
    assert read_lines(out)[0]["conversations"][0] == {"from": "human", "value": "fine"}


def test_otlp_takes_a_model_that_is_not_text(tmp_path: Path) -> None:
    # Anyone can log such a record; the span name's cache used to hash the raw value.
    part = tmp_path / "date=2025-10-21" / "host=a" / "w.jsonl"
    part.parent.mkdir(parents=True)
    base = {"timestamp": "2025-10-21T10:00:00+00:00", "request_id": "r"}
    records = [{**base, "model": ["a", "b"]}, {**base, "model": {"x": 1}}]
    part.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    out = tmp_path / "spans.jsonl"
    assert export(tmp_path, out, "otlp-json", RecordFilter()).written == 2
    spans = read_lines(out)[0]["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert [s["name"] for s in spans] == ["text_completion ['a', 'b']", "text_completion {'x': 1}"]
