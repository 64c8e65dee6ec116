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
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from ._record_view import finish_reasons, token_counts

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
_KIND_CLIENT = 3  # SPAN_KIND_CLIENT
_STATUS_ERROR = 2  # STATUS_CODE_ERROR


def _value(value: Any) -> dict[str, Any] | None:
    """An OTLP AnyValue (64-bit integers as strings, as the protobuf JSON mapping has them)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, list | tuple):
        values = [v for v in (_value(item) for item in value) if v is not None]
        return {"arrayValue": {"values": values}}
    return None


def _nanos(timestamp: Any) -> int | None:
    if not isinstance(timestamp, str):
        return None
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
        if isinstance(part, Mapping) and isinstance(part.get("text"), str):
            parts.append({"type": "text", "content": part["text"]})
        elif isinstance(part, Mapping) and part.get("type"):
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
        if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
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
        ms = [m for m in messages if isinstance(m, Mapping)]
        system = [p for m in ms if m.get("role") == "system" for p in _parts(m.get("content"))]
        inputs = [_message(m) for m in ms if m.get("role") != "system"]
        if system:
            attrs["gen_ai.system_instructions"] = orjson.dumps(system).decode()
        attrs["gen_ai.input.messages"] = orjson.dumps(inputs).decode()
    elif isinstance(record.get("prompt"), str):
        prompt = [{"role": "user", "parts": _parts(record["prompt"])}]
        attrs["gen_ai.input.messages"] = orjson.dumps(prompt).decode()
    response = record.get("response")
    choices = response.get("choices") if isinstance(response, Mapping) else None
    if isinstance(choices, list):
        outputs = []
        for choice in choices:
            if not isinstance(choice, Mapping):
                continue
            message = choice.get("message")
            item: dict[str, Any] = (
                _message(message)
                if isinstance(message, Mapping)
                else {"role": "assistant", "parts": _parts(choice.get("text"))}
            )
            item["finish_reason"] = choice.get("finish_reason")
            outputs.append(item)
        attrs["gen_ai.output.messages"] = orjson.dumps(outputs).decode()
    params = record.get("parameters")
    if isinstance(params, Mapping) and isinstance(params.get("tools"), list):
        attrs["gen_ai.tool.definitions"] = orjson.dumps(params["tools"]).decode()


def _ids(request_id: str) -> tuple[str, str]:
    digest = hashlib.sha256(request_id.encode()).hexdigest()
    return digest[:32], digest[32:48]


def span_attributes(record: Mapping[str, Any], options: ExportOptions) -> dict[str, Any]:
    """The span's attributes as plain values (strings, numbers, booleans, lists)."""
    endpoint = record.get("endpoint")
    operation = _OPERATIONS.get(endpoint if isinstance(endpoint, str) else "", "")
    if not operation:
        operation = "chat" if isinstance(record.get("messages"), list) else "text_completion"
    attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": "vllm"}
    if record.get("model") is not None:
        attrs["gen_ai.request.model"] = str(record["model"])
    params = record.get("parameters")
    if isinstance(params, Mapping):
        for key, name in _REQUEST_ATTRS.items():
            value = params.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attrs.setdefault(name, value)
        stop = params.get("stop")
        if isinstance(stop, str | list):
            attrs["gen_ai.request.stop_sequences"] = [stop] if isinstance(stop, str) else stop
    response = record.get("response")
    if isinstance(response, Mapping):
        if isinstance(response.get("id"), str):
            attrs["gen_ai.response.id"] = response["id"]
        if isinstance(response.get("model"), str):
            attrs["gen_ai.response.model"] = response["model"]
    reasons = finish_reasons(record)
    if reasons:
        attrs["gen_ai.response.finish_reasons"] = reasons
    tokens_in, tokens_out = token_counts(record)
    if tokens_in is not None:
        attrs["gen_ai.usage.input_tokens"] = tokens_in
    if tokens_out is not None:
        attrs["gen_ai.usage.output_tokens"] = tokens_out
    ttft = record.get("ttft_ms")
    if isinstance(ttft, int | float) and not isinstance(ttft, bool):
        attrs["gen_ai.response.time_to_first_chunk"] = ttft / 1000  # seconds
    if options.server_address:
        host, _, port = options.server_address.rpartition(":")
        if host and port.isdigit():
            attrs["server.address"], attrs["server.port"] = host, int(port)
        else:
            attrs["server.address"] = options.server_address
    if record.get("error") is not None:
        detail = record.get("error_detail")
        kind = detail.get("kind") if isinstance(detail, Mapping) else None
        status = record.get("status_code")
        attrs["error.type"] = str(kind or status or "_OTHER")
    if isinstance(record.get("status_code"), int):
        attrs["http.response.status_code"] = record["status_code"]
    if isinstance(record.get("request_id"), str):
        attrs["vllm_middleware.request_id"] = record["request_id"]
    if options.otlp_content:
        _content_attrs(record, attrs)
    return attrs


def span_of(record: Mapping[str, Any], options: ExportOptions) -> dict[str, Any] | None:
    """One record as an OTLP/JSON span (None without a request id or a readable timestamp)."""
    request_id = record.get("request_id")
    start = _nanos(record.get("timestamp"))
    if not isinstance(request_id, str) or start is None:
        return None
    latency = record.get("latency_ms")
    duration = int(latency * 1_000_000) if isinstance(latency, int | float) else 0
    attrs = span_attributes(record, options)
    trace_id, span_id = _ids(request_id)
    span: dict[str, Any] = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": f"{attrs['gen_ai.operation.name']} {attrs.get('gen_ai.request.model', '')}".strip(),
        "kind": _KIND_CLIENT,
        "startTimeUnixNano": str(start),
        "endTimeUnixNano": str(start + max(duration, 0)),
        "attributes": [
            {"key": key, "value": value}
            for key, value in ((k, _value(v)) for k, v in attrs.items())
            if value is not None
        ],
        "status": {},
    }
    if record.get("error") is not None:
        span["status"] = {"code": _STATUS_ERROR, "message": str(record["error"])}
    return span


def _request(
    batch: list[tuple[str, dict[str, Any]]], options: ExportOptions, version: str
) -> dict[str, Any]:
    by_host: dict[str, list[dict[str, Any]]] = {}
    for host, span in batch:
        by_host.setdefault(host, []).append(span)
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": options.service_name}},
                        {"key": "host.name", "value": {"stringValue": host}},
                    ]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "vllm-middleware", "version": version},
                        "schemaUrl": SCHEMA_URL,
                        "spans": spans,
                    }
                ],
            }
            for host, spans in by_host.items()
        ]
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm-middleware")
    except PackageNotFoundError:
        return "0"


def span_batches(
    records: Iterable[Mapping[str, Any]], options: ExportOptions, result: ExportResult
) -> Iterator[dict[str, Any]]:
    """`ExportTraceServiceRequest` documents of at most `BATCH` spans, grouped by host."""
    version = _version()
    batch: list[tuple[str, dict[str, Any]]] = []
    for record in records:
        span = span_of(record, options)
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


def otlp_lines(
    records: Iterable[Mapping[str, Any]], options: ExportOptions, result: ExportResult
) -> Iterator[bytes]:
    for document in span_batches(records, options, result):
        yield orjson.dumps(document) + b"\n"
