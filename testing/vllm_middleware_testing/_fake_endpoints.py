"""The fake's answers beyond chat and completions: embeddings, rerank/score, tokenize and
detokenize, the Responses API (plain and streamed) and audio transcriptions.

Shapes follow vLLM 0.33's protocol models (`entrypoints/pooling/*/protocol.py`,
`serve/tokenize/protocol.py`, `openai/responses/protocol.py`,
`speech_to_text/transcription/protocol.py`); values are deterministic functions of the input.
"""

from __future__ import annotations

import base64
import math
import secrets
import struct
import time
import zlib
from collections.abc import Mapping
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from ._fake_checks import Settings, parse_json_body
from ._fake_plan import DONE, Drop, Prepared, Send, cut_midway
from ._fake_text import content_text, count_tokens, default_chunker, fake_reply, parse_triggers
from ._fake_tokens import token_ids, tokens_of
from ._fake_wire import FakeHTTPError, dumps, validation_error, vllm_validation_error

EMBEDDING_DIM = 16
ROUTES = (
    "/v1/embeddings",
    "/v1/rerank",
    "/rerank",
    "/v1/score",
    "/score",
    "/tokenize",
    "/detokenize",
    "/v1/responses",
    "/v1/audio/transcriptions",
)


def embedding(text: str, dimensions: int = EMBEDDING_DIM) -> list[float]:
    """The fake's unit vector for ``text``."""
    seed = zlib.crc32(text.encode())
    raw = [math.sin(seed * (i + 1) * 0.001 + i) for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _usage(prompt_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def _texts(s: Settings, value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]
    raise validation_error(
        s.flavor, s.error_shape, "Input should be a valid string", f"body.{param}"
    )


def _similarity(a: str, b: str) -> float:
    left, right = embedding(a), embedding(b)
    return round((sum(x * y for x, y in zip(left, right, strict=True)) + 1) / 2, 6)


def embeddings(s: Settings, body: Mapping[str, Any]) -> dict[str, Any]:
    texts = _texts(s, body.get("input"), "input")
    dimensions = body.get("dimensions") or EMBEDDING_DIM
    data = []
    for index, text in enumerate(texts):
        vector: Any = embedding(text, dimensions)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": vector})
    return {
        "id": "embd-" + secrets.token_hex(8),
        "object": "list",
        "created": int(time.time()),
        "model": s.model,
        "data": data,
        "usage": _usage(sum(count_tokens(t) for t in texts)),
    }


def rerank(s: Settings, body: Mapping[str, Any]) -> dict[str, Any]:
    query = body.get("query")
    if not isinstance(query, str):
        raise validation_error(s.flavor, s.error_shape, "Field required: query", "body.query")
    documents = _texts(s, body.get("documents"), "documents")
    results = [
        {
            "index": index,
            "document": {"text": doc, "multi_modal": None},
            "relevance_score": _similarity(query, doc),
        }
        for index, doc in enumerate(documents)
    ]
    results.sort(key=lambda r: -float(r["relevance_score"]))  # type: ignore[arg-type]
    top_n = body.get("top_n") or 0
    if top_n:
        results = results[:top_n]
    tokens = sum(count_tokens(query) + count_tokens(doc) for doc in documents)
    return {
        "id": "rerank-" + secrets.token_hex(8),
        "model": s.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results,
    }


_SCORE_PAIRS = (
    ("queries", "documents"),
    ("queries", "items"),
    ("text_1", "text_2"),
    ("data_1", "data_2"),
)


def score(s: Settings, body: Mapping[str, Any]) -> dict[str, Any]:
    pair = next((p for p in _SCORE_PAIRS if p[0] in body and p[1] in body), None)
    if pair is None:
        raise validation_error(s.flavor, s.error_shape, "Field required: queries", "body.queries")
    left, right = _texts(s, body[pair[0]], pair[0]), _texts(s, body[pair[1]], pair[1])
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise vllm_validation_error(
            s.error_shape, "Input lengths must be either 1:1, 1:N or N:N", pair[0]
        )
    data = [
        {"index": index, "object": "score", "score": _similarity(a, b)}
        for index, (a, b) in enumerate(zip(left, right, strict=True))
    ]
    tokens = sum(count_tokens(a) + count_tokens(b) for a, b in zip(left, right, strict=True))
    return {
        "id": "score-" + secrets.token_hex(8),
        "object": "list",
        "created": int(time.time()),
        "model": s.model,
        "data": data,
        "usage": _usage(tokens),
    }


class Vocabulary:
    """Token ids the fake handed out, so /detokenize can turn them back into text."""

    def __init__(self) -> None:
        self._words: dict[int, str] = {}

    def tokenize(self, s: Settings, body: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(body.get("messages"), list):
            text = "".join(
                f"<|{m.get('role')}|>{content_text(m.get('content'))}"
                for m in body["messages"]
                if isinstance(m, Mapping)
            )
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise validation_error(s.flavor, s.error_shape, "Field required: prompt", "body.prompt")
        tokens = tokens_of(text)
        ids = token_ids(text)
        self._words.update(zip(ids, tokens, strict=True))
        return {
            "count": len(ids),
            "max_model_len": s.max_model_len,
            "tokens": ids,
            "token_strs": tokens if body.get("return_token_strs") else None,
        }

    def detokenize(self, s: Settings, body: Mapping[str, Any]) -> dict[str, Any]:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise validation_error(s.flavor, s.error_shape, "Field required: tokens", "body.tokens")
        return {"prompt": "".join(self._words.get(i, f"<{i}>") for i in ids)}


# The Responses API ---------------------------------------------------------------------------


def _response_text(body: Mapping[str, Any]) -> str:
    value = body.get("input")
    if isinstance(value, str):
        return value
    texts = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, Mapping) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [
                    p.get("text", "") for p in content if isinstance(p, Mapping) and "text" in p
                ]
    return " ".join(texts)


def _response_object(
    s: Settings,
    body: Mapping[str, Any],
    response_id: str,
    created: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "created_at": created,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": s.model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 1.0),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "background": False,
        "max_output_tokens": body.get("max_output_tokens") or s.max_model_len,
        "max_tool_calls": None,
        "previous_response_id": body.get("previous_response_id"),
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": status,
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


def responses(s: Settings, body: Mapping[str, Any]) -> Prepared:
    text = _response_text(body)
    if not text:
        raise validation_error(s.flavor, s.error_shape, "Field required: input", "body.input")
    reply = fake_reply(text, max_tokens=body.get("max_output_tokens"))
    response_id = "resp_" + secrets.token_hex(8)
    item_id = "msg_" + secrets.token_hex(8)
    created = int(time.time())
    prompt_tokens = count_tokens(text) + count_tokens(str(body.get("instructions") or ""))
    usage = {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": reply.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": prompt_tokens + reply.completion_tokens,
    }
    part: dict[str, Any] = {
        "type": "output_text",
        "text": reply.content,
        "annotations": [],
        "logprobs": None,
    }
    item = {
        "id": item_id,
        "content": [part],
        "role": "assistant",
        "status": "completed",
        "type": "message",
    }
    status = "completed" if reply.finish_reason == "stop" else "incomplete"
    final = _response_object(s, body, response_id, created, status, [item], usage)
    if status == "incomplete":
        final["incomplete_details"] = {"reason": "max_output_tokens"}
    triggers = parse_triggers(text)
    if not body.get("stream"):
        return Prepared(False, triggers, body=final)
    events: list[Any] = []

    def emit(kind: str, **fields: Any) -> None:
        event = {"type": kind, "sequence_number": len(events), **fields}
        payload = b"event: " + kind.encode() + b"\ndata: " + dumps(event) + b"\n\n"
        events.append(Send(payload, "content" if kind.endswith(".delta") else "role"))

    start = _response_object(s, body, response_id, created, "in_progress", [], None)
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    added = {**item, "content": [], "status": "in_progress"}
    emit("response.output_item.added", output_index=0, item=added)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    emit("response.content_part.added", **where, part={**part, "text": ""})
    for piece in default_chunker(reply.content) if reply.content else []:
        emit("response.output_text.delta", **where, delta=piece, logprobs=[])
    emit("response.output_text.done", **where, text=reply.content, logprobs=[])
    emit("response.content_part.done", **where, part=part)
    emit("response.output_item.done", output_index=0, item=item)
    emit(f"response.{status}", response=final)
    if triggers.drop:
        events = [*cut_midway(events), Drop()]
    else:
        events.append(DONE)
    return Prepared(True, triggers, events=events)


# Audio -----------------------------------------------------------------------------------------


def _form(
    s: Settings, headers: Mapping[str, str], raw: bytes
) -> dict[str, tuple[str | None, bytes]]:
    content_type = headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise validation_error(s.flavor, s.error_shape, "Expected multipart/form-data", "body.file")
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = (part.get_filename(), payload)
    return fields


def transcription(s: Settings, headers: Mapping[str, str], raw: bytes) -> dict[str, Any]:
    fields = _form(s, headers, raw)
    if "file" not in fields:
        raise validation_error(s.flavor, s.error_shape, "Field required: file", "body.file")
    model = fields.get("model", (None, b""))[1].decode() or None
    if model is not None and model != s.model:
        raise FakeHTTPError(
            404,
            {
                "error": {
                    "message": f"The model `{model}` does not exist.",
                    "type": "NotFoundError",
                    "param": "model",
                    "code": 404,
                }
            },
        )
    audio = fields["file"][1]
    seconds = max(1, len(audio) // 32000)  # 16 kHz mono 16-bit
    return {
        "text": f"Fake transcript of {len(audio)} bytes of audio.",
        "usage": {"type": "duration", "seconds": seconds},
    }


class EndpointHandler:
    """Dispatches the routes in `ROUTES`; keeps the vocabulary across requests."""

    def __init__(self) -> None:
        self.vocabulary = Vocabulary()

    def handle(self, s: Settings, path: str, headers: Mapping[str, str], raw: bytes) -> Prepared:
        if path == "/v1/audio/transcriptions":
            return Prepared(False, parse_triggers(""), body=transcription(s, headers, raw))
        body = parse_json_body(s, headers, raw)
        if path == "/v1/responses":
            return responses(s, body)
        model = body.get("model")
        if model is not None and model != s.model:
            message = f"The model `{model}` does not exist."
            raise FakeHTTPError(
                404,
                {
                    "error": {
                        "message": message,
                        "type": "NotFoundError",
                        "param": "model",
                        "code": 404,
                    }
                },
            )
        if path == "/v1/embeddings":
            answer = embeddings(s, body)
        elif path in ("/v1/rerank", "/rerank"):
            answer = rerank(s, body)
        elif path in ("/v1/score", "/score"):
            answer = score(s, body)
        elif path == "/tokenize":
            answer = self.vocabulary.tokenize(s, body)
        else:
            answer = self.vocabulary.detokenize(s, body)
        return Prepared(False, parse_triggers(""), body=answer)
