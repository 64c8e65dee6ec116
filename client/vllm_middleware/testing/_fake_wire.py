"""JSON shapes of the fake vLLM server, per flavour (see the wire reference, sections 2 to 5)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

Flavor = Literal["v0.33", "v0.10.2"]
ErrorShape = Literal["nested", "flat"]

VERSIONS: dict[str, str] = {"v0.33": "0.33.0", "v0.10.2": "0.10.2"}

QUEUE_FULL_MESSAGE = (
    "The engine is currently busy and cannot accept new requests. "
    "Please try again later or on a different instance."
)
MIDSTREAM_MESSAGE_V0_10 = "Fake engine failure injected mid-stream"

_TRIGGERED_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequestError", "Request rejected by the fake vLLM server."),
    404: ("NotFoundError", "The requested resource was not found."),
    500: ("InternalServerError", "Internal server error"),
    501: ("NotImplementedError", "The model does not support Chat Completions API"),
    503: ("Service Unavailable", QUEUE_FULL_MESSAGE),
}


def dumps(obj: Any) -> bytes:
    """Compact, non-ASCII-preserving JSON, as Starlette and pydantic write it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class FakeHTTPError(Exception):
    """Raised while preparing a request; becomes an HTTP error response."""

    def __init__(self, status: int, payload: Any) -> None:
        super().__init__(status)
        self.status = status
        self.payload = payload


def error_body(
    shape: ErrorShape, message: str, err_type: str, code: int, param: str | None = None
) -> dict[str, Any]:
    info = {"message": message, "type": err_type, "param": param, "code": code}
    if shape == "flat":
        return {"object": "error", **info}
    return {"error": info}


def api_error(
    shape: ErrorShape, code: int, err_type: str, message: str, param: str | None = None
) -> FakeHTTPError:
    return FakeHTTPError(code, error_body(shape, message, err_type, code, param))


def validation_error(
    flavor: Flavor, shape: ErrorShape, message: str, loc: str | None = None
) -> FakeHTTPError:
    """A request-schema failure: FastAPI's handler uses the HTTP phrase as the type.

    v0.33 names the dotted location in ``param``; v0.10.2 left it null. The message text is a
    plausible rendering of pydantic's error, not a byte-exact copy.
    """
    if flavor == "v0.33":
        return api_error(shape, 400, "Bad Request", f"1 validation error:\n  {message}", loc)
    return api_error(shape, 400, "Bad Request", message)


def unauthorized_body() -> dict[str, Any]:
    return {"error": "Unauthorized"}


def triggered_error(shape: ErrorShape, status: int) -> FakeHTTPError:
    """The error a ``[[status:NNN]]`` trigger produces."""
    if status == 401:
        return FakeHTTPError(401, unauthorized_body())
    if status in _TRIGGERED_ERRORS:
        err_type, message = _TRIGGERED_ERRORS[status]
    else:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        err_type = phrase.replace(" ", "").replace("-", "") + "Error"
        message = phrase
    return api_error(shape, status, err_type, message)


def midstream_error_event(flavor: Flavor, shape: ErrorShape) -> bytes:
    """The in-band error event payload (without the ``data: `` framing)."""
    if flavor == "v0.33":
        inner = error_body(shape, "Internal server error", "InternalServerError", 500)
        return dumps({"error": inner.get("error", inner)})
    # v0.10.2 serialized the streaming error with plain json.dumps, hence the spaces.
    inner = error_body(shape, MIDSTREAM_MESSAGE_V0_10, "BadRequestError", 400)
    return json.dumps({"error": inner.get("error", inner)}).encode()


@dataclass
class ToolCallPlan:
    call_id: str
    name: str
    arguments: str


@dataclass
class ChoicePlan:
    """Everything one output choice will contain."""

    index: int
    content: str
    reasoning: str | None
    finish_reason: str
    completion_tokens: int
    tool_call: ToolCallPlan | None = None


@dataclass
class Wire:
    """Builds bodies and chunks for one response (one id, one ``created``)."""

    flavor: Flavor
    response_id: str
    created: int
    model: str
    chat: bool
    prompt_tokens: int
    reasoning_enabled: bool = False

    @property
    def new(self) -> bool:
        return self.flavor == "v0.33"

    @property
    def fingerprint(self) -> str | None:
        if not self.new:
            return None
        digest = hashlib.sha256(self.model.encode()).hexdigest()[:8]
        return f"vllm-{VERSIONS[self.flavor]}-{digest}"

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def _reasoning_details(self, choices: list[ChoicePlan]) -> dict[str, int] | None:
        if not (self.new and self.chat and self.reasoning_enabled):
            return None
        return {"reasoning_tokens": sum(_count_reasoning(choice) for choice in choices)}

    def final_usage(self, choices: list[ChoicePlan], with_nulls: bool) -> dict[str, Any]:
        completion = sum(choice.completion_tokens for choice in choices)
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens": completion,
        }
        details = self._reasoning_details(choices)
        if with_nulls:
            usage["prompt_tokens_details"] = None
            usage["completion_tokens_details"] = details
        elif details is not None:
            usage["completion_tokens_details"] = details
        return usage

    def running_usage(self, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "completion_tokens_details": None,
        }

    # Non-streaming bodies -------------------------------------------------------------------

    def chat_body(self, choices: list[ChoicePlan]) -> dict[str, Any]:
        out_choices = []
        for choice in choices:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if choice.tool_call else choice.content,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
            }
            calls = []
            if choice.tool_call is not None:
                calls.append(
                    {
                        "id": choice.tool_call.call_id,
                        "type": "function",
                        "function": {
                            "name": choice.tool_call.name,
                            "arguments": choice.tool_call.arguments,
                        },
                    }
                )
            if calls or not self.new:
                message["tool_calls"] = calls
            message["reasoning" if self.new else "reasoning_content"] = choice.reasoning
            out: dict[str, Any] = {
                "index": choice.index,
                "message": message,
                "logprobs": None,
                "finish_reason": choice.finish_reason,
                "stop_reason": None,
                "token_ids": None,
            }
            if self.new:
                out["routed_experts"] = None
                out["weight_versions"] = None
            out_choices.append(out)
        body = self._head(chunk=False)
        body["choices"] = out_choices
        body["service_tier"] = None
        body["system_fingerprint"] = self.fingerprint
        body["usage"] = self.final_usage(choices, with_nulls=True)
        body["prompt_logprobs"] = None
        body["prompt_token_ids"] = None
        if self.new:
            body["prompt_text"] = None
        body["kv_transfer_params"] = None
        if self.new:
            body["ec_transfer_params"] = None
            body["metrics"] = None
        return body

    def completion_body(self, choices: list[ChoicePlan]) -> dict[str, Any]:
        out_choices = []
        for choice in choices:
            out: dict[str, Any] = {
                "index": choice.index,
                "text": choice.content,
                "logprobs": None,
                "finish_reason": choice.finish_reason,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
            }
            if self.new:
                out["routed_experts"] = None
                out["weight_versions"] = None
            out_choices.append(out)
        body = self._head(chunk=False)
        body["choices"] = out_choices
        body["service_tier"] = None
        body["system_fingerprint"] = self.fingerprint
        body["usage"] = self.final_usage(choices, with_nulls=True)
        body["kv_transfer_params"] = None
        if self.new:
            body["ec_transfer_params"] = None
            body["metrics"] = None
        return body

    # Stream chunks ----------------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        chunk = self._head(chunk=True)
        chunk["choices"] = [choice]
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def role_chunk(self, index: int, usage: dict[str, Any] | None) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        chunk = self._chunk(choice, usage)
        chunk["prompt_token_ids"] = None
        if self.new:
            chunk["prompt_text"] = None
        return chunk

    def delta_chunk(
        self, index: int, delta: dict[str, Any], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": None,
            "token_ids": None,
        }
        chunk = self._chunk(choice, usage)
        if self.new:
            chunk["kv_transfer_params"] = None
        return chunk

    def finish_chunk(
        self, index: int, finish_reason: str, usage: dict[str, Any] | None, fingerprint: bool
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": index,
            "delta": {},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "token_ids": None,
        }
        if self.new:
            choice["weight_versions"] = None
        chunk = self._chunk(choice, usage)
        if self.new:
            if fingerprint:
                chunk["system_fingerprint"] = self.fingerprint
            chunk["kv_transfer_params"] = None
        return chunk

    def text_chunk(
        self, index: int, text: str, finish_reason: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_token_ids": None,
            "token_ids": None,
        }
        if self.new:
            choice["weight_versions"] = None
        chunk = self._chunk(choice, usage)
        if self.new:
            chunk["kv_transfer_params"] = None
        return chunk

    def usage_chunk(self, choices: list[ChoicePlan]) -> dict[str, Any]:
        chunk = self._head(chunk=True)
        chunk["choices"] = []
        chunk["usage"] = self.final_usage(choices, with_nulls=False)
        if self.new:
            chunk["system_fingerprint"] = self.fingerprint
        return chunk


def _count_reasoning(choice: ChoicePlan) -> int:
    return len((choice.reasoning or "").split())


def models_body(flavor: Flavor, model: str, max_model_len: int) -> dict[str, Any]:
    """``GET /v1/models`` with the one served model (section 6)."""
    created = int(time.time())
    hex_len = 8 if flavor == "v0.33" else 16
    permission = {
        "id": "modelperm-" + secrets.token_hex(hex_len),
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}
