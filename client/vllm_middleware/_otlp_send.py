"""Sending the records' spans to an OTLP/HTTP endpoint with the OpenTelemetry exporter.

The `[otlp]` extra (`opentelemetry-exporter-otlp-proto-http`) encodes and posts protobuf; the
spans are the same as the OTLP/JSON files' (`_otlp`), batch by batch, so memory stays bounded
by one batch whatever the number of records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from ._exceptions import ConfigurationError, ExportError
from ._otlp import otlp_lines

if TYPE_CHECKING:
    from ._export import ExportOptions, ExportResult

__all__ = ["send_otlp"]


def _unwrap(value: Mapping[str, Any]) -> Any:
    ((kind, inner),) = value.items()
    if kind == "intValue":
        return int(inner)
    if kind == "arrayValue":
        return [_unwrap(v) for v in inner.get("values", [])]
    return inner


def send_otlp(
    records: Iterable[Mapping[str, Any]],
    options: ExportOptions,
    result: ExportResult,
    endpoint: str,
    *,
    timeout: float = 30.0,
) -> None:
    """Post every record's span to `endpoint` (e.g. `http://collector:4318/v1/traces`)."""
    try:
        from opentelemetry import trace as trace_api
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import SpanExportResult
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import Status, StatusCode
    except ImportError:
        raise ConfigurationError(
            "sending spans needs the OpenTelemetry exporter: pip install 'vllm-middleware[otlp]'"
        ) from None

    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout)
    sampled = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
    try:
        for line in otlp_lines(records, options, result):
            document = orjson.loads(line)
            spans = []
            for resource_spans in document["resourceSpans"]:
                resource = Resource(
                    {
                        a["key"]: _unwrap(a["value"])
                        for a in resource_spans["resource"]["attributes"]
                    }
                )
                for scope_spans in resource_spans["scopeSpans"]:
                    scope = InstrumentationScope(
                        scope_spans["scope"]["name"],
                        scope_spans["scope"].get("version"),
                        scope_spans.get("schemaUrl"),
                    )
                    for span in scope_spans["spans"]:
                        status = Status(StatusCode.UNSET)
                        if span["status"].get("code") == 2:
                            status = Status(StatusCode.ERROR, span["status"].get("message"))
                        spans.append(
                            ReadableSpan(
                                name=span["name"],
                                context=trace_api.SpanContext(
                                    int(span["traceId"], 16),
                                    int(span["spanId"], 16),
                                    is_remote=False,
                                    trace_flags=sampled,
                                ),
                                resource=resource,
                                attributes={
                                    a["key"]: _unwrap(a["value"]) for a in span["attributes"]
                                },
                                kind=trace_api.SpanKind.CLIENT,
                                status=status,
                                start_time=int(span["startTimeUnixNano"]),
                                end_time=int(span["endTimeUnixNano"]),
                                instrumentation_scope=scope,
                            )
                        )
            if exporter.export(spans) is not SpanExportResult.SUCCESS:
                raise ExportError(
                    f"the OTLP endpoint {endpoint} refused a batch of {len(spans)} spans "
                    f"({result.written - len(spans)} sent before it)"
                )
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]
