"""The OTLP span fast path on the records that could fool a cache keyed by values: numbers that
Python finds equal but JSON writes apart, `%` in cached text, long parameters, hosts that are
not text; and records the general path used to crash on."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from vllm_middleware._export import ExportOptions, ExportResult, export
from vllm_middleware._otlp import _Clock, _SpanEncoder, otlp_lines
from vllm_middleware._record_view import RecordFilter

OPTIONS = ExportOptions(server_address="vllm.internal:8000")


def _usual(seq: int, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "timestamp": f"2026-01-01T10:00:00.{seq:06d}+00:00",
        "request_id": f"req_{seq}",
        "latency_ms": 12.5,
        "endpoint": "chat/completions",
        "model": "m",
        "parameters": {"temperature": 1, "max_tokens": 8},
        "response": {
            "id": f"chatcmpl-{seq}",
            "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop"}],
        },
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        "ttft_ms": None,
        "error": None,
        "status_code": 200,
        "host": "a",
    }
    for name, value in fields.items():
        if name.startswith("response_"):
            record["response"][name.removeprefix("response_")] = value
        else:
            record[name] = value
    return orjson.loads(orjson.dumps(record))  # as the reader hands it over


VARIANTS: list[dict[str, Any]] = [
    {},
    {"status_code": 200.0},
    {"status_code": True},
    {"status_code": None},
    {"parameters": {"temperature": 1.0, "max_tokens": 8}},
    {"parameters": {"temperature": True, "max_tokens": 8}},
    {"parameters": {"max_tokens": 8, "temperature": 1}},
    {"parameters": None},
    {"parameters": {"temperature": 1, "tools": [{"name": "t" * 300}], "stop": ["a", 1]}},
    {"parameters": {"temperature": 2, "tools": [{"name": "t" * 300}], "stop": ["a", 1]}},
    {"usage": {"prompt_tokens": 1.0, "completion_tokens": True}},
    {"usage": {"prompt_tokens": True, "completion_tokens": 2}},
    {"usage": None, "response_usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    {"usage": {"prompt_tokens": 1}},
    {"model": "100% m%s", "response_model": "50%d"},
    {"model": 1},
    {"model": 1.0},
    {"model": None},
    {"response_model": 7},
    {"response_choices": [{"finish_reason": None}]},
    {"response_choices": [{"finish_reason": 1}]},
    {"response_choices": [{"finish_reason": 1.0}]},
    {"response_choices": ["stop"]},
    {"response_choices": {"finish_reason": "stop"}},
    {"response_choices": "s"},
    {"endpoint": "embeddings"},
    {"error": "boom", "status_code": 500},
    {"latency_ms": True},
    {"latency_ms": 0},
    {"latency_ms": 3},
    {"ttft_ms": 4.5},
    {"ttft_ms": True},
    {"timestamp": "2026-01-01T10:00:00+00:00"},
    {"timestamp": "2026-01-01T10:00:00.+12345+00:00"},
    {"timestamp": "2026-01-01T10:00:00.1234\u00b2+00:00"},
    {"timestamp": "2026-01-01T10:00:00.123456+01:00"},
    {"timestamp": "1970-01-01T00:00:00.000001+00:00"},
    {"timestamp": 5},
    {"request_id": 5},
    {"response_id": 5},
]


def test_the_fast_path_makes_the_general_bytes_for_lookalike_records() -> None:
    # One warm encoder for all: a cached piece for 1 must not serve 1.0 or true, and so on.
    warm = _SpanEncoder(OPTIONS)
    fast = warm.fast_span()
    records = [_usual(seq, **variant) for seq, variant in enumerate(VARIANTS * 2)]
    for record in records:
        expected = _SpanEncoder(OPTIONS).span(copy.deepcopy(record))
        assert fast(record) == expected, record


def test_deep_parameters_do_not_stop_an_export(tmp_path: Path) -> None:
    # orjson reads JSON nested up to 1024 deep but writes only 254: the parameters' JSON,
    # which keyed a cache, raised out of the export.
    part = tmp_path / "logs" / "date=2026-01-01" / "host=a" / "w.jsonl"
    part.parent.mkdir(parents=True)
    deep = b'{"x":' + b"[" * 300 + b"0" + b"]" * 300 + b"}"
    line = orjson.dumps(_usual(1)).replace(b'{"temperature":1,"max_tokens":8}', deep)
    part.write_bytes(line + b"\n" + orjson.dumps(_usual(2)) + b"\n")
    out = tmp_path / "spans.jsonl"
    result = export(tmp_path / "logs", out, "otlp-json", RecordFilter(), ExportOptions())
    assert result.written == 2
    (document,) = [orjson.loads(text) for text in out.read_bytes().splitlines()]
    assert len(document["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 2


def test_a_timestamp_with_a_superscript_digit_is_skipped_not_fatal() -> None:
    # "²".isdigit() is true but int() refuses it.
    assert _Clock().nanos("2026-01-01T10:00:00.12345\u00b2+00:00") is None


@pytest.mark.parametrize(
    "hosts",
    [
        ["a", "a", "b", "a", "b", "b"],
        [1, 1.0, "1", True, None, "", "unknown", 1],
        ["a"] * 600 + ["b"] * 30 + ["a"] * 10,
    ],
)
def test_spans_are_grouped_by_host_in_the_order_first_seen(hosts: list[Any]) -> None:
    records = [_usual(seq, host=host) for seq, host in enumerate(hosts)]
    result = ExportResult()
    documents = [orjson.loads(line) for line in otlp_lines(records, OPTIONS, result)]
    assert result.written == len(hosts)
    seen = []
    for batch_start, document in zip(range(0, len(hosts), 512), documents, strict=True):
        batch = hosts[batch_start : batch_start + 512]
        names = [str(h) if h and type(h) is not str else (h or "unknown") for h in batch]
        groups: dict[str, list[str]] = {}
        for seq, name in enumerate(names, batch_start):
            groups.setdefault(name, []).append(f"req_{seq}")
        got = {}
        for resource in document["resourceSpans"]:
            (host_attr,) = [
                a for a in resource["resource"]["attributes"] if a["key"] == "host.name"
            ]
            spans = resource["scopeSpans"][0]["spans"]
            got[host_attr["value"]["stringValue"]] = [
                next(
                    a["value"]["stringValue"]
                    for a in span["attributes"]
                    if a["key"] == "vllm_middleware.request_id"
                )
                for span in spans
            ]
        assert list(got) == list(groups)
        assert got == groups
        seen.append(document)
    assert len(seen) == len(documents)
