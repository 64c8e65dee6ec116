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
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson

from ._otlp_content import content_attrs

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

    __slots__ = ("base", "second")

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


# Encoded pieces for values that repeat from record to record (models, parameters, finish
# reasons, token counts, statuses): looked up instead of encoded again. Bounded: a table is
# cleared when full, so a stream of distinct values costs what no cache would, and long
# values (anything a log can hold) are encoded each time instead of kept.
_CACHE_SIZE = 16_384
_CACHE_KEY_BYTES = 256
# The parameters read, in the table's order (not a set's: the output must not depend on
# string hashing). Parameters are cached by their JSON, so 1, 1.0 and true, or 0.0 and -0.0,
# differ.
_PARAM_KEYS = (*_REQUEST_ATTRS, "stop")
_sha256 = hashlib.sha256
_RESPONSE_ID = b"," + _K["gen_ai.response.id"] + b'{"stringValue":'
_REQUEST_ID = b"," + _K["vllm_middleware.request_id"] + b'{"stringValue":'
_ERROR_TYPE = b"," + _K["error.type"] + b'{"stringValue":'
_TTFT = b"," + _K["gen_ai.response.time_to_first_chunk"]


def _param_attrs(params: dict[str, Any]) -> bytes:
    """The request parameters' attributes, each led by a comma."""
    out = []
    named: set[str] = set()
    for key, name in _REQUEST_ATTRS.items():
        if key not in params:
            continue
        value = params[key]
        number = type(value) is int or (type(value) is float and math.isfinite(value))
        if number and name not in named:
            named.add(name)
            out.append(b"," + _K[name] + _number_value(value))
    stop = params.get("stop")
    if type(stop) is str or type(stop) is list:
        stops = [stop] if type(stop) is str else [str(x) for x in stop]
        out.append(b"," + _K["gen_ai.request.stop_sequences"] + _texts_value(stops))
    return b"".join(out)


def _reasons_attr(choices: list[Any]) -> bytes:
    reasons = [
        str(c["finish_reason"])
        for c in choices
        if type(c) is dict and c.get("finish_reason") is not None
    ]
    if not reasons:
        return b""
    return b"," + _K["gen_ai.response.finish_reasons"] + _texts_value(reasons)


# The fields the fast path reads, in one call (a missing one: the general path).
_FIELDS = itemgetter(
    "request_id",
    "timestamp",
    "latency_ms",
    "endpoint",
    "model",
    "parameters",
    "response",
    "usage",
    "ttft_ms",
    "error",
    "status_code",
)
# Everything of a successful span but its variable parts, in the general path's order: trace
# and span ids, name, start, end, then the attributes (head, parameters, response id, response
# model, finish reasons, input and output tokens, time to first chunk, server, status code),
# the request id last.
_FAST = (
    b'{"traceId":"%.32s","spanId":"%s","name":%s,"kind":3,'
    b'"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":[%s%s'
    + _RESPONSE_ID
    + b"%s}}%s%s%s%s%s%s%s"
    + _REQUEST_ID
    + b'%s}}],"status":{}}'
)


class _SpanEncoder:
    """Records to encoded OTLP/JSON spans, for one export.

    Runs once per record, so it reads the parsed dict directly, looks up what repeats and
    joins one list of pieces once: building ~50 small dicts per span for orjson to walk cost
    four times the reader's own time per record, and a helper call per attribute about as
    much again."""

    def __init__(self, options: ExportOptions) -> None:
        self._server = b"".join(b"," + attr for attr in _server(options.server_address))
        self._content = options.otlp_content
        self._clock = _Clock()
        self._nanos = self._clock.nanos
        self._heads: dict[tuple[str, str | None], tuple[bytes, bytes]] = {}
        self._params: dict[bytes, bytes] = {}
        self._models: dict[str, bytes] = {}
        self._reasons: dict[str, bytes] = {}
        self._inputs: dict[int, bytes] = {}
        self._outputs: dict[int, bytes] = {}
        self._statuses: dict[int, bytes] = {}

    @staticmethod
    def _keep(table: dict[Any, bytes], key: Any, value: bytes) -> bytes:
        if type(key) is int or len(key) <= _CACHE_KEY_BYTES:
            if len(table) >= _CACHE_SIZE:
                table.clear()
            table[key] = value
        return value

    def _head(self, operation: str, model: str | None) -> tuple[bytes, bytes]:
        """(span name, first attributes: operation, provider, request model)."""
        attrs = _OPERATION_ATTRS[operation] + b"," + _PROVIDER
        if model is not None:
            attrs += b"," + _K["gen_ai.request.model"] + _text_value(model)
        name = _dumps(f"{operation} {model}" if model is not None else operation)
        if model is None or len(model) <= _CACHE_KEY_BYTES:
            if len(self._heads) >= _CACHE_SIZE:
                self._heads.clear()
            self._heads[(operation, model)] = (name, attrs)
        return name, attrs

    def _param_piece(self, params: dict[str, Any], key: bytes) -> bytes:
        # The parameters' JSON is the key when short (the usual case: cheapest to make), else
        # the JSON of the values read: an object and an array never collide.
        if len(key) > _CACHE_KEY_BYTES:
            key = _dumps(tuple(map(params.get, _PARAM_KEYS)))
            found = self._params.get(key)
            if found is not None:
                return found
        return self._keep(self._params, key, _param_attrs(params))

    def _model_piece(self, model: str) -> bytes:
        attr = _K["gen_ai.response.model"] + _text_value(model)
        return self._keep(self._models, model, b"," + attr)

    def _reason_piece(self, reason: str, choices: list[Any]) -> bytes:
        return self._keep(self._reasons, reason, _reasons_attr(choices))

    def _input_piece(self, tokens: int) -> bytes:
        attr = _K["gen_ai.usage.input_tokens"] + _int(tokens)
        return self._keep(self._inputs, tokens, b"," + attr)

    def _output_piece(self, tokens: int) -> bytes:
        attr = _K["gen_ai.usage.output_tokens"] + _int(tokens)
        return self._keep(self._outputs, tokens, b"," + attr)

    def _status_piece(self, status: int) -> bytes:
        attr = _K["http.response.status_code"] + _int(status)
        return self._keep(self._statuses, status, b"," + attr)

    def span(self, record: Mapping[str, Any]) -> bytes | None:
        """One record as an encoded span (None without a request id or a readable timestamp)."""
        get = record.get
        request_id = get("request_id")
        start = self._nanos(get("timestamp"))
        if type(request_id) is not str or start is None:
            return None
        latency = get("latency_ms")
        end = start
        if (type(latency) is int or type(latency) is float) and latency > 0:
            end += int(latency * 1_000_000)
        endpoint = get("endpoint")
        operation = _OPERATIONS.get(endpoint) if type(endpoint) is str else None
        if operation is None:
            operation = "chat" if type(get("messages")) is list else "text_completion"
        model = get("model")
        if model is not None and type(model) is not str:
            model = str(model)
        head = self._heads.get((operation, model)) or self._head(operation, model)
        ids = _sha256(request_id.encode()).hexdigest().encode()
        parts = [
            b'{"traceId":"',
            ids[:32],
            b'","spanId":"',
            ids[32:48],
            b'","name":',
            head[0],
            b',"kind":3,"startTimeUnixNano":"',  # 3: SPAN_KIND_CLIENT
            str(start).encode(),
            b'","endTimeUnixNano":"',
            str(end).encode(),
            b'","attributes":[',
            head[1],
        ]
        add = parts.append
        params = get("parameters")
        if type(params) is dict:
            key = _dumps(params)
            add(self._params.get(key) or self._param_piece(params, key))
        response = get("response")
        usage = get("usage")
        if type(response) is dict:
            response_get = response.get
            response_id = response_get("id")
            if type(response_id) is str:
                parts += (_RESPONSE_ID, _dumps(response_id), b"}}")
            response_model = response_get("model")
            if type(response_model) is str:
                add(self._models.get(response_model) or self._model_piece(response_model))
            choices = response_get("choices")
            if type(choices) is list:
                # The usual single choice is looked up by its finish reason alone.
                one = choices[0] if len(choices) == 1 else None
                reason = one.get("finish_reason") if type(one) is dict else None
                if type(reason) is str:
                    add(self._reasons.get(reason) or self._reason_piece(reason, choices))
                else:
                    add(_reasons_attr(choices))
            if not isinstance(usage, dict):
                usage = response_get("usage")
        if isinstance(usage, dict):
            tokens = usage.get("prompt_tokens")
            if isinstance(tokens, int):
                # True and 1 encode alike ("1"), so a table keyed by the value will do.
                add(self._inputs.get(tokens) or self._input_piece(tokens))
            tokens = usage.get("completion_tokens")
            if isinstance(tokens, int):
                add(self._outputs.get(tokens) or self._output_piece(tokens))
        ttft = get("ttft_ms")
        if (type(ttft) is int or type(ttft) is float) and math.isfinite(ttft):
            parts += (_TTFT, b'{"doubleValue":%r}}' % (ttft / 1000))
        add(self._server)
        error = get("error")
        status = get("status_code")
        if error is not None:
            detail = get("error_detail")
            kind = detail.get("kind") if type(detail) is dict else None
            parts += (_ERROR_TYPE, _dumps(str(kind or status or "_OTHER")), b"}}")
        if type(status) is int:
            add(self._statuses.get(status) or self._status_piece(status))
        parts += (_REQUEST_ID, _dumps(request_id), b"}}")
        if self._content:
            content: dict[str, Any] = {}
            content_attrs(record, content)
            parts.extend(b"," + _key(key) + _text_value(value) for key, value in content.items())
        if error is None:
            add(b'],"status":{}}')
        else:  # 2: STATUS_CODE_ERROR
            parts += (b'],"status":{"code":2,"message":', _dumps(str(error)), b"}}")
        return b"".join(parts)

    def fast_span(self) -> Callable[[Mapping[str, Any]], bytes | None]:
        """`span` with a fast path for the usual record: the writers' fields all there, a
        successful chat or completion with one choice, a timestamp of the current second. It
        makes the same bytes as the general path (which takes every other record) with about
        half the work: the fields read in one call, the caches in the closure, one format."""
        if self._content:
            return self.span
        slow, clock, head_of, param_piece = self.span, self._clock, self._head, self._param_piece
        params_cache, models, reasons = self._params, self._models, self._reasons
        inputs, outputs, statuses = self._inputs, self._outputs, self._statuses
        model_piece, reason_piece = self._model_piece, self._reason_piece
        input_piece, output_piece, status_piece = (
            self._input_piece,
            self._output_piece,
            self._status_piece,
        )
        server = self._server
        heads: dict[str, dict[str, tuple[bytes, bytes]]] = {name: {} for name in _OPERATIONS}
        fields, dumps, sha256, isfinite = _FIELDS, _dumps, _sha256, math.isfinite

        def span(record: Mapping[str, Any]) -> bytes | None:
            try:
                (request_id, timestamp, latency, endpoint, model, params, response, usage, ttft,
                 error, status) = fields(record)  # fmt: skip
            except (KeyError, TypeError):
                return slow(record)
            if (
                type(timestamp) is not str
                or timestamp[:19] != clock.second
                or len(timestamp) != 32
                or timestamp[19] != "."
                or timestamp[26:] != "+00:00"
                or not (micros := timestamp[20:26]).isdigit()
                or type(request_id) is not str
                or type(model) is not str
                or type(endpoint) is not str
                or (by_model := heads.get(endpoint)) is None
                or error is not None
                or type(response) is not dict
                or type(response_id := response.get("id")) is not str
                or type(choices := response.get("choices")) is not list
                or len(choices) != 1
                or type(choice := choices[0]) is not dict
                or type(reason := choice.get("finish_reason")) is not str
            ):
                return slow(record)
            head = by_model.get(model)
            if head is None:
                head = head_of(_OPERATIONS[endpoint], model)
                if len(model) <= _CACHE_KEY_BYTES:
                    if len(by_model) >= _CACHE_SIZE:
                        by_model.clear()
                    by_model[model] = head
            start = clock.base + int(micros) * 1000
            end = start
            if (type(latency) is int or type(latency) is float) and latency > 0:
                end += int(latency * 1_000_000)
            if type(params) is dict:
                key = dumps(params)
                params_part = params_cache.get(key) or param_piece(params, key)
            else:
                params_part = b""
            response_model = response.get("model")
            if type(response_model) is str:
                model_part = models.get(response_model) or model_piece(response_model)
            else:
                model_part = b""
            reason_part = reasons.get(reason) or reason_piece(reason, choices)
            if not isinstance(usage, dict):
                usage = response.get("usage")
            input_part = output_part = b""
            if isinstance(usage, dict):
                tokens = usage.get("prompt_tokens")
                if isinstance(tokens, int):
                    input_part = inputs.get(tokens) or input_piece(tokens)
                tokens = usage.get("completion_tokens")
                if isinstance(tokens, int):
                    output_part = outputs.get(tokens) or output_piece(tokens)
            if (type(ttft) is int or type(ttft) is float) and isfinite(ttft):
                ttft_part = _TTFT + b'{"doubleValue":%r}}' % (ttft / 1000)
            else:
                ttft_part = b""
            if type(status) is int:
                status_part = statuses.get(status) or status_piece(status)
            else:
                status_part = b""
            ids = sha256(request_id.encode()).hexdigest().encode()
            return _FAST % (
                ids,
                ids[32:48],
                head[0],
                start,
                end,
                head[1],
                params_part,
                dumps(response_id),
                model_part,
                reason_part,
                input_part,
                output_part,
                ttft_part,
                server,
                status_part,
                dumps(request_id),
            )

        return span


def span_of(record: Mapping[str, Any], options: ExportOptions) -> bytes | None:
    """One record as an encoded OTLP/JSON span (None without a request id or a readable
    timestamp)."""
    return _SpanEncoder(options).span(record)


def _request(by_host: dict[str, list[bytes]], options: ExportOptions, version: str) -> bytes:
    # One join over all the pieces: every copy of a batch (~0.7 MB) is fresh memory the
    # kernel has to fault in, so the document is built in one copy, not three.
    scope = _dumps({"name": "vllm-middleware", "version": version})
    schema = _dumps(SCHEMA_URL)
    pieces = [b'{"resourceSpans":[']
    for host, spans in by_host.items():
        resource = _dumps(
            {
                "attributes": [
                    {"key": "service.name", "value": {"stringValue": options.service_name}},
                    {"key": "host.name", "value": {"stringValue": host}},
                ]
            }
        )
        if len(pieces) > 1:
            pieces.append(b",")
        pieces += (b'{"resource":', resource, b',"scopeSpans":[{"scope":', scope)
        pieces += (b',"schemaUrl":', schema, b',"spans":[')
        for span in spans:
            pieces += (span, b",")
        pieces[-1] = b"]}]}"
    pieces.append(b"]}\n")
    return b"".join(pieces)


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
    by_host: dict[str, list[bytes]] = {}  # a batch's spans, by host in the order first seen
    count = 0
    for record in records:
        span = encode(record)
        if span is None:
            result.skipped["no request id or timestamp"] += 1
            continue
        host = record.get("host") or "unknown"
        spans = by_host.get(host if type(host) is str else str(host))
        if spans is None:
            spans = by_host[host if type(host) is str else str(host)] = []
        spans.append(span)
        count += 1
        if count >= BATCH:
            result.written += count
            yield _request(by_host, options, version)
            by_host, count = {}, 0
    if count:
        result.written += count
        yield _request(by_host, options, version)
