"""Every export format's output pinned byte for byte on a fixed, varied log tree.

The expected files under `tests/client/golden/export/` (gzipped: `zcat` reads them) were written by
the export code as it was before its speed work (commit `b9237b0`), so any change that alters
a single output byte, of any format or option, fails here. The tree mixes the shapes real logs
hold (tools and tool calls, media parts, system and developer turns, errors, completions, odd
and malformed values, non-ASCII text, several hosts and days, more spans than one OTLP batch)
with seeded random records; nothing in it depends on the clock or the machine.

To rewrite the expected files after a deliberate format change:
`VLLM_MW_WRITE_GOLDEN=1 pytest tests/client/test_export_golden.py` (and say why in the commit).
"""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from vllm_middleware._export import ExportOptions, export
from vllm_middleware._otlp import _version
from vllm_middleware._record_view import RecordFilter

GOLDEN = Path(__file__).parent / "golden" / "export"
VERSION_MARK = b"@VERSION@"  # the package version in OTLP scopes, not pinned

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city \u00e9\u00e8 \u2603",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TEXTS = (
    "Hello",
    "",
    "Weather in Paris?",
    "caf\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001f600",
    'quotes " and \\ backslash\n\tnewline',
    "line\u2028separator\u2029 and \x00\x1f controls",
    "[REDACTED]",
    "x" * 40,
)
MODELS = ("vllm:qwen-2.5-omni-7b", "llama-3", "m\u00f6del/\u00fcnicode")
HOSTS = ("app-1", "app-2", "h\u00f6st")


def _timestamp(rng: random.Random, day: str) -> Any:
    roll = rng.random()
    if roll < 0.8:
        return (
            f"{day}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
            f".{rng.randrange(1_000_000):06d}+00:00"
        )
    if roll < 0.85:
        return f"{day}T10:00:00+00:00"
    if roll < 0.9:
        return f"{day}T10:00:00.5+02:00"
    if roll < 0.93:
        return f"{day} 10:00:00"
    if roll < 0.96:
        return "not a time"
    return rng.choice([None, 17, f"{day}T25:00:00.000000+00:00"])


def _content(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.7:
        return rng.choice(TEXTS)
    if roll < 0.8:
        return [
            {"type": "text", "text": rng.choice(TEXTS)},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]
    if roll < 0.85:
        ref = {"sha256": "ab" * 32, "mime": "image/png", "bytes": 9, "path": "ab/x.png"}
        return [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": ref}]
    if roll < 0.9:
        ref2 = {"media_ref": {"sha256": "cd" * 32, "mime": "audio/wav", "path": "cd/y.wav"}}
        return [{"type": "input_audio", "input_audio": ref2}, "loose string", 5]
    if roll < 0.95:
        return None
    return rng.choice([[], 42, {"text": "dict content"}])


def _call(rng: random.Random, i: int, *, malformed: bool = True) -> Any:
    if malformed and rng.random() < 0.1:
        return rng.choice(["not a call", {"id": "c", "function": "f"}])
    call: dict[str, Any] = {
        "type": "function",
        "function": {
            "name": rng.choice(["get_weather", "lookup", "\u00e9"]),
            "arguments": rng.choice(['{"city": "Paris"}', "not json", "", None, '{"a": [1, 2.5]}']),
        },
    }
    if rng.random() < 0.8:
        call["id"] = f"call_{i}"
    return call


def _messages(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.03:
        return rng.choice([[], "text", None, [{"content": "no role"}], [5]])
    turns: list[Any] = []
    if rng.random() < 0.4:
        turns.append({"role": rng.choice(["system", "developer"]), "content": rng.choice(TEXTS)})
    for _ in range(rng.randrange(1, 4)):
        turns.append({"role": "user", "content": _content(rng)})
        if rng.random() < 0.3:
            # Well-formed: a malformed call in a request turn crashes `sharegpt` (a known bug).
            calls = [_call(rng, j, malformed=False) for j in range(rng.randrange(1, 3))]
            turns.append({"role": "assistant", "content": None, "tool_calls": calls})
            turns.append({"role": "tool", "tool_call_id": "call_0", "content": '{"t": 21}'})
        elif rng.random() < 0.3:
            turns.append({"role": "assistant", "content": rng.choice(TEXTS)})
    if rng.random() < 0.1:
        turns[-1]["name"] = "alice"
        turns[-1]["extra_key"] = {"kept": False}
    return turns


def _response(rng: random.Random, seq: int, chat: bool) -> Any:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, "text", {"choices": "x"}, {"choices": []}, {"choices": [3]}])
    choices: list[Any] = []
    for index in range(rng.choice([1, 1, 1, 2])):
        choice: dict[str, Any] = {"index": index}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": rng.choice(TEXTS)}
            if rng.random() < 0.25:
                message["tool_calls"] = [_call(rng, j) for j in range(rng.randrange(1, 3))]
                message["content"] = rng.choice([None, "", "Calling a tool."])
            if rng.random() < 0.05:
                message = rng.choice([None, "str"])  # type: ignore[assignment]
            choice["message"] = message
        else:
            choice["text"] = rng.choice([*TEXTS, None])
        choice["finish_reason"] = rng.choice(["stop", "length", "tool_calls", None, 7])
        choices.append(choice)
    response: dict[str, Any] = {"object": "chat.completion", "choices": choices}
    if rng.random() < 0.9:
        response["id"] = f"chatcmpl-{seq}"
    if rng.random() < 0.8:
        response["model"] = rng.choice(MODELS)
    if rng.random() < 0.5:
        response["usage"] = {"prompt_tokens": rng.randrange(500), "completion_tokens": 12}
    return response


def _parameters(rng: random.Random) -> Any:
    if rng.random() < 0.05:
        return rng.choice([None, [], "x"])
    params: dict[str, Any] = {}
    for key, values in (
        ("temperature", [0.2, 0.7, 1, 0, 1e-7, 2.5e20, True, "hot"]),
        ("top_p", [0.9, 1.0]),
        ("top_k", [40, -1]),
        ("max_tokens", [256, 8, None]),
        ("max_completion_tokens", [100]),
        ("frequency_penalty", [0.1]),
        ("presence_penalty", [-0.5]),
        ("seed", [1234, 2**62]),
        ("n", [1, 2]),
        ("stop", ["\n", ["END", "STOP"], [1, None], 5]),
        ("parallel_tool_calls", [True, False, "yes"]),
    ):
        if rng.random() < 0.35:
            params[key] = rng.choice(values)
    if rng.random() < 0.25:
        params["tools"] = rng.choice([[TOOL], [], "bad", [TOOL, {"type": "function"}]])
    return params


def _record(rng: random.Random, seq: int, day: str, host: str) -> dict[str, Any]:
    chat = rng.random() < 0.8
    record: dict[str, Any] = {
        "timestamp": _timestamp(rng, day),
        "request_id": rng.choice([f"req_{day}_{seq:05d}"] * 30 + [None, 123]),
        "model": rng.choice([*MODELS, None, 5]),
        "host": rng.choice([host, host, host, None, ""]),
        "endpoint": rng.choice(["chat/completions", "completions", "embeddings", None, 3]),
    }
    if chat:
        record["messages"] = _messages(rng)
    else:
        record["prompt"] = rng.choice([*TEXTS, [rng.choice(TEXTS)], ["a", "b"], [1, 2], None])
    record["response"] = _response(rng, seq, chat)
    record["parameters"] = _parameters(rng)
    record["latency_ms"] = rng.choice([12.5, 0, -3, 1234.567891, 7, None, "slow"])
    record["ttft_ms"] = rng.choice([None, 3.25, 100, 0.1, "x"])
    record["status_code"] = rng.choice([200, 200, 200, 400, 500, None, "200"])
    record["metadata"] = rng.choice([{"app": "a1", "tier": 2}, {"app": "a2", "ok": True}, None])
    record["error"] = None
    if rng.random() < 0.12:
        record["error"] = rng.choice(["boom", "Not \u00e9 found", 404])
        if rng.random() < 0.5:
            record["error_detail"] = rng.choice([{"kind": "NotFoundError"}, {"kind": ""}, "x"])
    if rng.random() < 0.7:
        record["usage"] = rng.choice(
            [
                {"prompt_tokens": 40, "completion_tokens": 42, "total_tokens": 82},
                {"prompt_tokens": rng.randrange(10_000), "completion_tokens": "many"},
                None,
            ]
        )
    if rng.random() < 0.05:
        record = {k: v for k, v in record.items() if rng.random() < 0.5}
    return record


def write_tree(root: Path) -> None:
    """The fixed log tree: 2 days x 3 hosts, about 600 records, a few unreadable lines."""
    rng = random.Random(16)
    seq = 0
    for day in ("2026-01-01", "2026-01-02"):
        for host in HOSTS:
            part = root / f"date={day}" / f"host={host}" / "w-1.jsonl"
            part.parent.mkdir(parents=True)
            lines = []
            for _ in range(95 + len(host)):
                lines.append(orjson.dumps(_record(rng, seq, day, host)))
                seq += 1
            lines.insert(3, b"")
            lines.insert(7, b"{not json")
            lines.insert(9, b"[1, 2]")
            # The same conversation twice, for the dedupe cases.
            lines.extend([lines[20], lines[21], lines[20]])
            part.write_bytes(b"\n".join(lines) + b"\n")


_FINE_TUNING = RecordFilter(exclude_errors=True)
CASES: dict[str, tuple[str, RecordFilter, ExportOptions]] = {
    "chat": ("openai-chat", _FINE_TUNING, ExportOptions()),
    "chat-drop": ("openai-chat", _FINE_TUNING, ExportOptions(media="drop")),
    "chat-dedupe": ("openai-chat", _FINE_TUNING, ExportOptions(dedupe=True)),
    "chat-all": ("openai-chat", RecordFilter(), ExportOptions(media="drop")),
    "chat-filtered": (
        "openai-chat",
        RecordFilter(exclude_errors=True, meta={"app": "a1"}, finish_reason="stop"),
        ExportOptions(),
    ),
    "completions": ("openai-completions", _FINE_TUNING, ExportOptions()),
    "completions-dedupe": ("openai-completions", RecordFilter(), ExportOptions(dedupe=True)),
    "sharegpt": ("sharegpt", _FINE_TUNING, ExportOptions()),
    "sharegpt-dedupe": ("sharegpt", _FINE_TUNING, ExportOptions(media="drop", dedupe=True)),
    "otlp": ("otlp-json", RecordFilter(), ExportOptions()),
    "otlp-content": (
        "otlp-json",
        RecordFilter(),
        ExportOptions(otlp_content=True, server_address="vllm.internal:8000"),
    ),
    "otlp-named": (
        "otlp-json",
        RecordFilter(host="app-2"),
        ExportOptions(service_name="svc \u00e9", server_address="vllm-host"),
    ),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden") / "logs"
    write_tree(root)
    return root


def _summary(written: int, skipped: dict[str, int]) -> bytes:
    return orjson.dumps({"written": written, "skipped": skipped}, option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_output_is_unchanged(case: str, tree: Path, tmp_path: Path) -> None:
    fmt, flt, options = CASES[case]
    out = tmp_path / "out.jsonl"
    result = export(tree, out, fmt, flt, options)
    got = out.read_bytes()
    summary = _summary(result.written, dict(result.skipped)) + b"\n"
    version = orjson.dumps({"version": _version()})[1:-1]
    expected_file = GOLDEN / f"{case}.jsonl.gz"
    summary_file = GOLDEN / f"{case}.summary.json"
    if os.environ.get("VLLM_MW_WRITE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        pinned = got.replace(version, b'"version":"' + VERSION_MARK + b'"')
        expected_file.write_bytes(gzip.compress(pinned, mtime=0))
        summary_file.write_bytes(summary)
    expected = gzip.decompress(expected_file.read_bytes()).replace(
        b'"version":"' + VERSION_MARK + b'"', version
    )
    assert result.written > 0
    assert got == expected, f"{case}: output differs from {expected_file}"
    assert summary == summary_file.read_bytes()


def _usual(record: dict[str, Any], seq: int) -> dict[str, Any]:
    """`record` made into the shape the span fast path takes (a successful chat or completion
    with one choice), its other fields (parameters, latency, usage, ...) left as odd as they
    are."""
    usual = dict(record)
    response = usual.get("response")
    usual["response"] = dict(response) if isinstance(response, dict) else {}
    usual["response"]["id"] = f"chatcmpl-{seq}"
    usual["response"]["choices"] = [{"index": 0, "finish_reason": ("stop", "length")[seq % 2]}]
    usual["timestamp"] = f"2025-10-21T10:00:{seq % 60:02d}.{seq:06d}+00:00"
    usual["request_id"] = f"req_{seq}"
    usual["model"] = MODELS[seq % len(MODELS)]
    usual["endpoint"] = ("chat/completions", "completions")[seq % 2]
    usual["error"] = None
    for key in ("latency_ms", "parameters", "usage", "ttft_ms", "status_code"):
        usual.setdefault(key, None)
    return usual


def test_otlp_fast_path_makes_the_general_bytes(tree: Path) -> None:
    """The span fast path against the general one, record by record, as the fast path meets
    them (timestamp of the current second, cached pieces warm or cold): the tree's records
    rarely share a second or have the usual shape, so the export cases above run most of
    them through the general path; here every record also runs in the usual shape."""
    from vllm_middleware._otlp import _SpanEncoder
    from vllm_middleware._reader import iter_dicts

    originals = list(iter_dicts(tree))
    usual = [_usual(record, seq) for seq, record in enumerate(originals)]
    warm = _SpanEncoder(ExportOptions(server_address="vllm.internal:8000"))
    fast_warm = warm.fast_span()
    general_calls = 0
    for record in originals + usual:
        cold = _SpanEncoder(ExportOptions(server_address="vllm.internal:8000"))
        expected = cold.span(record)  # also sets the clock's second to this record's

        def counted(r: Any, span: Any = cold.span) -> Any:
            nonlocal general_calls
            general_calls += 1
            return span(r)

        cold.span = counted  # type: ignore[method-assign]
        assert cold.fast_span()(record) == expected, record
        warm.span(record)
        assert fast_warm(record) == expected, record
    # Every usual record took the fast path.
    assert general_calls <= len(originals), (general_calls, len(originals))
