"""The OTLP span fast path: the usual record (the writers' fields all there, a successful chat
or completion with one choice) made into the same bytes as the general encoder's
(`_otlp_span._SpanEncoder.span`), which takes every other record.

A span is mostly what repeats from record to record: the name and the operation, model,
parameters, response model, finish reason, server and status attributes. Those fields are
encoded together as one JSON key (JSON tells 1, 1.0 and true apart, which Python's equality
does not) that finds them already encoded, as four runs of bytes; the record's own values
(ids, times, token counts, time to first chunk) go between them in one join. One lookup per
span instead of a lookup, a type check and a piece per attribute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson

from ._otlp_span import (
    _CACHE_KEY_BYTES,
    _CACHE_SIZE,
    _K,
    _OPERATIONS,
    _PARAM_KEYS,
    _REQUEST_ID,
    _RESPONSE_ID,
    _TTFT,
    _int,
    _param_attrs,
    _reasons_attr,
    _sha256,
    _text_value,
)

if TYPE_CHECKING:
    from ._otlp_span import _SpanEncoder

__all__ = ["fast_span", "orjson_keys"]

_dumps = orjson.dumps
# The fields the fast path reads, in one call (a missing one: the general path).
_FIELDS = (
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
# Shapes kept (a few hundred bytes each); cleared when full, like the general encoder's tables.
_SHAPES = 4096
_INPUT = b"," + _K["gen_ai.usage.input_tokens"]
_OUTPUT = b"," + _K["gen_ai.usage.output_tokens"]
# The ids, the name and the times: a short format. The rest of a span is joined, which costs
# less than formatting the whole span (a format grows its buffer as it goes).
_HEAD = (
    b'{"traceId":"%.32s","spanId":"%s","name":%s,"kind":3,'  # 3: SPAN_KIND_CLIENT
    b'"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":['
)
_END = b'}}],"status":{}}'


def orjson_keys(*names: str) -> tuple[str, ...]:
    """`names` as the very str objects orjson gives the keys it parses. It keeps one object per
    short key name (its key cache), and a dict lookup with the dict's own key object skips the
    string comparison: half the cost of reading eleven fields. Any other object finds the same
    entries (only slower), so an entry the cache dropped since costs time, never a result."""
    return tuple(orjson.loads(_dumps(dict.fromkeys(names))))


def _usage_parts(usage: Any, response: dict[str, Any]) -> tuple[bytes, bytes]:
    """The token count attributes as the general path makes them, for any usage."""
    if not isinstance(usage, dict):
        usage = response.get("usage")
    input_part = output_part = b""
    if isinstance(usage, dict):
        tokens = usage.get("prompt_tokens")
        if isinstance(tokens, int):
            input_part = _INPUT + _int(tokens)
        tokens = usage.get("completion_tokens")
        if isinstance(tokens, int):
            output_part = _OUTPUT + _int(tokens)
    return input_part, output_part


def _ttft_part(ttft: Any) -> bytes:
    if (type(ttft) is int or type(ttft) is float) and math.isfinite(ttft):
        return _TTFT + b'{"doubleValue":%r}}' % (ttft / 1000)
    return b""


def _count_piece(table: dict[int, bytes], lead: bytes, tokens: int) -> bytes:
    if len(table) >= _CACHE_SIZE:
        table.clear()
    piece = table[tokens] = lead + _int(tokens)
    return piece


# What a shape holds: the span's name; the attributes before the response id (operation,
# provider, request model, parameters); those between it and the token counts (response
# model, finish reason); those between the time to first chunk and the request id (server,
# status), each run led by its key as the general path writes it.
_Shape = tuple[bytes, bytes, bytes, bytes]


def fast_span(encoder: _SpanEncoder) -> Callable[[Mapping[str, Any]], bytes | None]:
    """`encoder.span` with the fast path in front: the same bytes for every record."""
    slow, clock, server = encoder.span, encoder.clock, encoder.server
    nanos = clock.nanos
    shapes: dict[bytes, _Shape] = {}
    inputs: dict[int, bytes] = {}
    outputs: dict[int, bytes] = {}
    fields = itemgetter(*orjson_keys(*_FIELDS))
    id_key, choices_key, model_key, reason_key, prompt_key, completion_key = orjson_keys(
        "id", "choices", "model", "finish_reason", "prompt_tokens", "completion_tokens"
    )
    dumps, sha256 = _dumps, _sha256

    def shape(
        endpoint: Any, model: Any, response: dict[str, Any], choice: Any, status: Any, params: Any
    ) -> _Shape | None:
        """The pieces for these fields, made as the general path makes each one (None: not a
        record the fast path takes)."""
        operation = _OPERATIONS.get(endpoint) if type(endpoint) is str else None
        if operation is None or type(choice) is not dict:
            return None
        if model is not None and type(model) is not str:
            model = str(model)
        name, head = encoder.head(operation, model)
        if type(params) is dict:
            head += _param_attrs(params)
        response_model = response.get("model")
        middle = b"}}"  # closes the response id
        if type(response_model) is str:
            middle += b"," + _K["gen_ai.response.model"] + _text_value(response_model)
        middle += _reasons_attr([choice])
        last = server
        if type(status) is int:
            last += b"," + _K["http.response.status_code"] + _int(status)
        return name, head + _RESPONSE_ID, middle, last + _REQUEST_ID

    def span(record: Mapping[str, Any]) -> bytes | None:
        try:
            (request_id, timestamp, latency, endpoint, model, params, response, usage, ttft,
             error, status) = fields(record)  # fmt: skip
            response_id = response[id_key]
            (choice,) = response[choices_key]
            # Everything the shape holds. A field of another type (a list or a dict where a
            # string belongs): a key no usual record makes, or a TypeError.
            key = dumps(
                (endpoint, model, response.get(model_key), choice[reason_key], status, params)
            )
        except (KeyError, TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            return slow(record)
        if error is not None or type(request_id) is not str or type(response_id) is not str:
            return slow(record)
        pieces = shapes.get(key)
        if pieces is None:
            if len(key) > _CACHE_KEY_BYTES and type(params) is dict:
                # Long parameters (tools, say): keyed by the values the attributes read.
                values = tuple(map(params.get, _PARAM_KEYS))
                key = dumps((endpoint, model, response.get("model"), choice["finish_reason"],
                             status, values, 0))  # fmt: skip
                pieces = shapes.get(key)
            if pieces is None:
                pieces = shape(endpoint, model, response, choice, status, params)
                if pieces is None:
                    return slow(record)
                if len(key) <= _CACHE_KEY_BYTES:
                    if len(shapes) >= _SHAPES:
                        shapes.clear()
                    shapes[key] = pieces
        # The second and its "." as cached, six digits, UTC: one string built and compared
        # costs less than slicing out and comparing each part.
        if (
            type(timestamp) is str
            and timestamp == f"{clock.prefix}{(micros := timestamp[20:26])}+00:00"
            and micros.isdecimal()
        ):
            start = clock.base + int(micros) * 1000
        else:
            found = nanos(timestamp)  # another second (cached from now on) or another form
            if found is None:
                return slow(record)
            start = found
        end = start
        if (type(latency) is float or type(latency) is int) and latency > 0:
            end += int(latency * 1_000_000)
        if (
            type(usage) is dict
            and type(input_tokens := usage.get(prompt_key)) is int
            and type(output_tokens := usage.get(completion_key)) is int
        ):
            # Keyed by exact ints only: 1.0 and True would find 1's piece.
            input_part = inputs.get(input_tokens) or _count_piece(inputs, _INPUT, input_tokens)
            output_part = outputs.get(output_tokens) or _count_piece(
                outputs, _OUTPUT, output_tokens
            )
        else:
            input_part, output_part = _usage_parts(usage, response)
        name, before_id, middle, last = pieces
        ids = sha256(request_id.encode()).hexdigest().encode()
        return b"".join(
            (
                _HEAD % (ids, ids[32:48], name, start, end),
                before_id,
                dumps(response_id),
                middle,
                input_part,
                output_part,
                b"" if ttft is None else _ttft_part(ttft),
                last,
                dumps(request_id),
                _END,
            )
        )

    return span
