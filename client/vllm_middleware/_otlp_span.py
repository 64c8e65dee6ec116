"""The general OTLP/JSON span encoder: any record to one encoded span, written as JSON text
piece by piece with the pieces that repeat from record to record (models, parameters, finish
reasons, token counts, statuses) encoded once per export. `_otlp_fast` takes the usual record
faster; this path takes every other one and is the reference both must match byte for byte.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from ._otlp_content import content_attrs

if TYPE_CHECKING:
    from ._export import ExportOptions

__all__ = ["_Clock", "_SpanEncoder"]

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

    __slots__ = ("base", "prefix", "second")

    def __init__(self) -> None:
        self.second = ""
        self.prefix = ""  # the cached second and its ".": what the fast path compares
        self.base = 0

    def nanos(self, timestamp: Any) -> int | None:
        if type(timestamp) is not str:
            return None
        if (
            len(timestamp) == 32
            and timestamp.endswith("+00:00")
            and timestamp[19] == "."
            and timestamp[20:26].isdecimal()  # what int() reads (isdigit: also "²")
        ):
            if timestamp[:19] != self.second:
                whole = _parse(timestamp[:19])
                if whole is None:
                    return None
                self.second, self.prefix, self.base = timestamp[:19], timestamp[:20], whole
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


def _builtin_sha256() -> Callable[[bytes], Any]:
    # CPython's own SHA-256 costs about a fifth less than OpenSSL's for a request id (no
    # EVP context to set up and wipe per call); the same digest. hashlib's when it is absent.
    for name in ("_sha2", "_sha256"):
        try:
            found: Callable[[bytes], Any] = importlib.import_module(name).sha256
        except (ImportError, AttributeError):
            continue
        return found
    return hashlib.sha256


_sha256 = _builtin_sha256()
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


class _SpanEncoder:
    """Records to encoded OTLP/JSON spans, for one export.

    Runs once per record, so it reads the parsed dict directly, looks up what repeats and
    joins one list of pieces once: building ~50 small dicts per span for orjson to walk cost
    four times the reader's own time per record, and a helper call per attribute about as
    much again."""

    def __init__(self, options: ExportOptions) -> None:
        self.server = b"".join(b"," + attr for attr in _server(options.server_address))
        self._content = options.otlp_content
        self.clock = _Clock()
        self._nanos = self.clock.nanos
        self._heads: dict[tuple[str, str | None], tuple[bytes, bytes]] = {}
        self._params: dict[bytes, bytes] = {}
        self._models: dict[str, bytes] = {}
        self._reasons: dict[str, bytes] = {}
        self._inputs: dict[int, bytes] = {}
        self._outputs: dict[int, bytes] = {}
        self._statuses: dict[int, bytes] = {}

    @staticmethod
    def _keep(table: dict[Any, bytes], key: Any, value: bytes) -> bytes:
        if isinstance(key, int) or len(key) <= _CACHE_KEY_BYTES:  # token counts may be true
            if len(table) >= _CACHE_SIZE:
                table.clear()
            table[key] = value
        return value

    def head(self, operation: str, model: str | None) -> tuple[bytes, bytes]:
        """(span name, first attributes: operation, provider, request model), cached."""
        return self._heads.get((operation, model)) or self._head(operation, model)

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
            try:
                key = _dumps(params)
            except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
                add(_param_attrs(params))
            else:
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
        add(self.server)
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
        """`span` with a fast path for the usual record (see `_otlp_fast`): the same bytes."""
        if self._content:
            return self.span
        from ._otlp_fast import fast_span

        return fast_span(self)
