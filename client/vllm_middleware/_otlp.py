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

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ._otlp_fast import orjson_keys
from ._otlp_span import _Clock as _Clock
from ._otlp_span import _SpanEncoder as _SpanEncoder

if TYPE_CHECKING:
    from ._export import ExportOptions, ExportResult

__all__ = ["SEMCONV_VERSION", "otlp_lines", "span_of"]

SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
BATCH = 512  # spans per ExportTraceServiceRequest line

_dumps = orjson.dumps


def span_of(record: Mapping[str, Any], options: ExportOptions) -> bytes | None:
    """One record as an encoded OTLP/JSON span (None without a request id or a readable
    timestamp)."""
    return _SpanEncoder(options).span(record)


def _request(by_host: dict[str, list[bytes]], options: ExportOptions, version: str) -> bytes:
    # One join of the spans themselves, with "," between them: the spans of every host, a
    # host's header joined to its first span and its closing to its last (so the comma
    # between two hosts' groups is the join's too). Every copy of a batch (~0.7 MB) is fresh
    # memory the kernel has to fault in, so the document is built in one copy, with no
    # Python step per span.
    scope = _dumps({"name": "vllm-middleware", "version": version})
    schema = _dumps(SCHEMA_URL)
    spans: list[bytes] = []
    for host, group in by_host.items():
        resource = _dumps(
            {
                "attributes": [
                    {"key": "service.name", "value": {"stringValue": options.service_name}},
                    {"key": "host.name", "value": {"stringValue": host}},
                ]
            }
        )
        group[0] = b"".join(
            (b'{"resource":', resource, b',"scopeSpans":[{"scope":', scope, b',"schemaUrl":',
             schema, b',"spans":[', group[0])
        )  # fmt: skip
        group[-1] += b"]}]}"
        spans += group
    spans[0] = b'{"resourceSpans":[' + spans[0]
    spans[-1] += b"]}\n"
    return b",".join(spans)


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
    encode = _SpanEncoder(options).fast_span()
    (host_key,) = orjson_keys("host")
    by_host: dict[str, list[bytes]] = {}  # a batch's spans, by host in the order first seen
    last: str | None = None  # the host of the previous span, whose list `add` appends to
    add: Callable[[bytes], None] = list[bytes]().append  # replaced before its first use
    count = 0
    for record in records:
        span = encode(record)
        if span is None:
            result.skipped["no request id or timestamp"] += 1
            continue
        host = record.get(host_key) or "unknown"
        if host != last:  # only a str can equal `last`; never None
            last = host if type(host) is str else str(host)
            spans = by_host.get(last)
            if spans is None:
                spans = by_host[last] = []
            add = spans.append
        add(span)
        count += 1
        if count >= BATCH:
            result.written += count
            yield _request(by_host, options, version)
            by_host, count, last = {}, 0, None
    if count:
        result.written += count
        yield _request(by_host, options, version)
