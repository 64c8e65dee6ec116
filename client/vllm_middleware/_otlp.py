"""Records as OpenTelemetry spans following the GenAI semantic conventions.

Conventions followed: OpenTelemetry semantic conventions v1.41.0, GenAI inference client spans
(status Development, so names may still change; `SEMCONV_VERSION` is written as the scope's
schema URL). One CLIENT span per record named `{gen_ai.operation.name} {gen_ai.request.model}`,
from the record's timestamp to timestamp + latency. Trace and span ids derive from the
request id, so exporting the same records twice yields the same spans (a backend deduplicates).
Message contents are opt-in (`gen_ai.input.messages`, `gen_ai.output.messages`,
`gen_ai.system_instructions`, `gen_ai.tool.definitions`).

`otlp_lines` writes OTLP/JSON (`ExportTraceServiceRequest` documents, one per line, as the
OpenTelemetry Collector's file exporter does) with nothing but orjson; `send_otlp` posts the
same spans to an OTLP/HTTP endpoint with the OpenTelemetry exporter (the `[otlp]` extra).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from ._record_view import token_counts

if TYPE_CHECKING:
    from ._export import ExportOptions, ExportResult

__all__ = ["SEMCONV_VERSION", "otlp_lines", "span_of"]

SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
BATCH = 512  # spans per ExportTraceServiceRequest line

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OPERATIONS = {"chat/completions": "chat", "completions": "text_completion"}
# Request parameters with a GenAI attribute of their own.
_REQUEST_ATTRS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
}


class _Clock:
    """Timestamps to Unix nanoseconds. The writers' form (`YYYY-MM-DDTHH:MM:SS.ffffff+00:00`)
    is read by slicing, with the second cached (a file's records share their seconds);
    anything else goes through `datetime.fromisoformat`."""

    def __init__(self) -> None:
        self.second = ""
        self.base = 0

    def nanos(self, timestamp: Any) -> int | None:
        if type(timestamp) is not str:
            return None
        if (
            len(timestamp) == 32
            and timestamp.endswith("+00:00")
            and timestamp[19] == "."
            and timestamp[20:26].isdigit()
        ):
            if timestamp[:19] != self.second:
                whole = _parse(timestamp[:19])
                if whole is None:
                    return None
                self.second, self.base = timestamp[:19], whole
            return self.base + int(timestamp[20:26]) * 1000
        return _parse(timestamp)


def _parse(timestamp: str) -> int | None:
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append({"type": "text", "content": part["text"]})
        elif isinstance(part, dict) and part.get("type"):
            parts.append({"type": str(part["type"])})  # media: its kind, not its bytes
    return parts


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    role = str(message.get("role"))
    parts: list[dict[str, Any]] = _parts(message.get("content"))
    if role == "tool":
        parts = [
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": message.get("content"),
            }
        ]
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            parts.append(
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": call["function"].get("name"),
                    "arguments": call["function"].get("arguments"),
                }
            )
    return {"role": role, "parts": parts}


def _content_attrs(record: Mapping[str, Any], attrs: dict[str, Any]) -> None:
    messages = record.get("messages")
    if isinstance(messages, list):
        ms = [m for m in messages if isinstance(m, dict)]
        system = [p for m in ms if m.get("role") == "system" for p in _parts(m.get("content"))]
        inputs = [_message(m) for m in ms if m.get("role") != "system"]
        if system:
            attrs["gen_ai.system_instructions"] = orjson.dumps(system).decode()
        attrs["gen_ai.input.messages"] = orjson.dumps(inputs).decode()
    elif isinstance(record.get("prompt"), str):
        prompt = [{"role": "user", "parts": _parts(record["prompt"])}]
        attrs["gen_ai.input.messages"] = orjson.dumps(prompt).decode()
    response = record.get("response")
    choices = response.get("choices") if isinstance(response, dict) else None
    if isinstance(choices, list):
        outputs = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            item: dict[str, Any] = (
                _message(message)
                if isinstance(message, dict)
                else {"role": "assistant", "parts": _parts(choice.get("text"))}
            )
            item["finish_reason"] = choice.get("finish_reason")
            outputs.append(item)
        attrs["gen_ai.output.messages"] = orjson.dumps(outputs).decode()
    params = record.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("tools"), list):
        attrs["gen_ai.tool.definitions"] = orjson.dumps(params["tools"]).decode()


def _ids(request_id: str) -> bytes:
    """Trace id (the first 32 hex digits) and span id (the next 16) of a request id."""
    return hashlib.sha256(request_id.encode()).hexdigest().encode()


# Spans are written as JSON text piece by piece: this runs once per record, and building
# ~50 small dicts per span for orjson to walk cost four times the reader's own time per record.
_dumps = orjson.dumps


def _key(name: str) -> bytes:
    return b'{"key":' + _dumps(name) + b',"value":'


def _int(value: int) -> bytes:
    return b'{"intValue":"%d"}}' % value


def _number_value(value: float) -> bytes:
    if type(value) is int:
        return _int(value)
    return b'{"doubleValue":' + _dumps(value) + b"}}"  # finite: checked by the caller


def _text_value(value: str) -> bytes:
    return b'{"stringValue":' + _dumps(value) + b"}}"


def _texts_value(values: list[str]) -> bytes:
    items = b",".join(b'{"stringValue":' + _dumps(v) + b"}" for v in values)
    return b'{"arrayValue":{"values":[' + items + b"]}}}"


_K = {
    name: _key(name)
    for name in (
        "gen_ai.operation.name",
        "gen_ai.request.model",
        "gen_ai.request.stop_sequences",
        "gen_ai.response.id",
        "gen_ai.response.model",
        "gen_ai.response.finish_reasons",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.time_to_first_chunk",
        "server.address",
        "server.port",
        "error.type",
        "http.response.status_code",
        "vllm_middleware.request_id",
        *_REQUEST_ATTRS.values(),
    )
}
_PROVIDER = _key("gen_ai.provider.name") + _text_value("vllm")
_OPERATION_ATTRS = {
    name: _K["gen_ai.operation.name"] + _text_value(name) for name in _OPERATIONS.values()
}


def _server(address: str | None) -> list[bytes]:
    if not address:
        return []
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        return [
            _K["server.address"] + _text_value(host),
            _K["server.port"] + _int(int(port)),
        ]
    return [_K["server.address"] + _text_value(address)]


# Encoded attributes for values that repeat from record to record (models, parameters, token
# counts, finish reasons, statuses): looked up instead of encoded again. Bounded: cleared when
# full, so a stream of distinct values costs what no cache would.
_MEMO: dict[tuple[str, type, Any], bytes] = {}
_MEMO_SIZE = 16_384


def _memo(name: str, value: Any, encode: Callable[[Any], bytes]) -> bytes:
    key = (name, type(value), value)
    found = _MEMO.get(key)
    if found is None:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.clear()
        found = _MEMO[key] = _K[name] + encode(value)
    return found


def _reasons_value(reasons: tuple[str, ...]) -> bytes:
    return _texts_value(list(reasons))


def span_attributes(record: Mapping[str, Any], options: ExportOptions) -> tuple[str, list[bytes]]:
    """The operation name and the span's attributes, each an encoded OTLP KeyValue."""
    endpoint = record.get("endpoint")
    operation = _OPERATIONS.get(endpoint) if type(endpoint) is str else None
    if operation is None:
        operation = "chat" if type(record.get("messages")) is list else "text_completion"
    attrs = [_OPERATION_ATTRS[operation], _PROVIDER]
    add = attrs.append
    model = record.get("model")
    if model is not None:
        add(_memo("gen_ai.request.model", str(model), _text_value))
    params = record.get("parameters")
    if type(params) is dict:
        named: set[str] = set()
        # In the table's order, not a set's: the output must not depend on string hashing.
        for key, name in _REQUEST_ATTRS.items():
            if key not in params:
                continue
            value = params[key]
            number = type(value) is int or (type(value) is float and math.isfinite(value))
            if number and name not in named:
                named.add(name)
                add(_memo(name, value, _number_value))
        stop = params.get("stop")
        if type(stop) is str or type(stop) is list:
            stops = [stop] if type(stop) is str else [str(x) for x in stop]
            add(_K["gen_ai.request.stop_sequences"] + _texts_value(stops))
    response = record.get("response")
    if type(response) is dict:
        if type(response.get("id")) is str:
            add(_K["gen_ai.response.id"] + _text_value(response["id"]))
        if type(response.get("model")) is str:
            add(_memo("gen_ai.response.model", response["model"], _text_value))
        choices = response.get("choices")
        if type(choices) is list:
            reasons = tuple(
                str(c["finish_reason"])
                for c in choices
                if type(c) is dict and c.get("finish_reason") is not None
            )
            if reasons:
                add(_memo("gen_ai.response.finish_reasons", reasons, _reasons_value))
    tokens_in, tokens_out = token_counts(record)
    if tokens_in is not None:
        add(_memo("gen_ai.usage.input_tokens", tokens_in, _int))
    if tokens_out is not None:
        add(_memo("gen_ai.usage.output_tokens", tokens_out, _int))
    ttft = record.get("ttft_ms")
    if (type(ttft) is int or type(ttft) is float) and math.isfinite(ttft):
        seconds = ttft / 1000
        add(_K["gen_ai.response.time_to_first_chunk"] + b'{"doubleValue":%r}}' % seconds)
    attrs.extend(_server(options.server_address))
    if record.get("error") is not None:
        detail = record.get("error_detail")
        kind = detail.get("kind") if type(detail) is dict else None
        error_type = str(kind or record.get("status_code") or "_OTHER")
        add(_K["error.type"] + _text_value(error_type))
    status = record.get("status_code")
    if type(status) is int:
        add(_memo("http.response.status_code", status, _int))
    add(_K["vllm_middleware.request_id"] + _text_value(str(record.get("request_id"))))
    if options.otlp_content:
        content: dict[str, Any] = {}
        _content_attrs(record, content)
        attrs.extend(_key(key) + _text_value(value) for key, value in content.items())
    return operation, attrs


def span_of(
    record: Mapping[str, Any], options: ExportOptions, clock: _Clock | None = None
) -> bytes | None:
    """One record as an encoded OTLP/JSON span (None without a request id or a readable
    timestamp)."""
    request_id = record.get("request_id")
    start = (clock or _Clock()).nanos(record.get("timestamp"))
    if type(request_id) is not str or start is None:
        return None
    latency = record.get("latency_ms")
    duration = 0
    if (type(latency) is int or type(latency) is float) and latency > 0:
        duration = int(latency * 1_000_000)
    operation, attrs = span_attributes(record, options)
    ids = _ids(request_id)
    model = record.get("model")
    status = b"{}"
    if record.get("error") is not None:
        # 2: STATUS_CODE_ERROR
        status = b'{"code":2,"message":' + _dumps(str(record["error"])) + b"}"
    # Joined from pieces: bytes %-formatting costs several times more per span.
    return b"".join(
        (
            b'{"traceId":"',
            ids[:32],
            b'","spanId":"',
            ids[32:48],
            b'","name":',
            _name(operation, model),
            b',"kind":3,"startTimeUnixNano":"',  # 3: SPAN_KIND_CLIENT
            str(start).encode(),
            b'","endTimeUnixNano":"',
            str(start + duration).encode(),
            b'","attributes":[',
            b",".join(attrs),
            b'],"status":',
            status,
            b"}",
        )
    )


_NAMES: dict[tuple[str, Any], bytes] = {}


def _name(operation: str, model: Any) -> bytes:
    """The span name, `{gen_ai.operation.name} {gen_ai.request.model}`, encoded (memoized)."""
    key = (operation, model)
    found = _NAMES.get(key)
    if found is None:
        if len(_NAMES) >= _MEMO_SIZE:
            _NAMES.clear()
        found = _NAMES[key] = _dumps(f"{operation} {model}" if model is not None else operation)
    return found


def _request(batch: list[tuple[str, bytes]], options: ExportOptions, version: str) -> bytes:
    by_host: dict[str, list[bytes]] = {}
    for host, span in batch:
        by_host.setdefault(host, []).append(span)
    scope = _dumps({"name": "vllm-middleware", "version": version})
    resources = []
    for host, spans in by_host.items():
        resource = _dumps(
            {
                "attributes": [
                    {"key": "service.name", "value": {"stringValue": options.service_name}},
                    {"key": "host.name", "value": {"stringValue": host}},
                ]
            }
        )
        resources.append(
            b'{"resource":%b,"scopeSpans":[{"scope":%b,"schemaUrl":%b,"spans":[%b]}]}'
            % (resource, scope, _dumps(SCHEMA_URL), b",".join(spans))
        )
    return b'{"resourceSpans":[' + b",".join(resources) + b"]}\n"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm-middleware")
    except PackageNotFoundError:
        return "0"


def otlp_lines(
    records: Iterable[Mapping[str, Any]], options: ExportOptions, result: ExportResult
) -> Iterator[bytes]:
    """`ExportTraceServiceRequest` documents of at most `BATCH` spans grouped by host, one
    encoded JSON line each."""
    version = _version()
    batch: list[tuple[str, bytes]] = []
    clock = _Clock()
    for record in records:
        span = span_of(record, options, clock)
        if span is None:
            result.skipped["no request id or timestamp"] += 1
            continue
        batch.append((str(record.get("host") or "unknown"), span))
        result.written += 1
        if len(batch) >= BATCH:
            yield _request(batch, options, version)
            batch = []
    if batch:
        yield _request(batch, options, version)
