"""JSON shapes of the fake vLLM server, per flavour (see the wire reference, sections 2 to 5)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from ._fake_tokens import chat_logprobs, completion_logprobs, prompt_logprobs, token_ids

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


def vllm_validation_error(
    shape: ErrorShape, message: str, param: str | None = None, value: Any = None
) -> FakeHTTPError:
    """A `VLLMValidationError` from a request model validator (v0.33): it escapes pydantic (it
    is not a ValueError), so it is answered as `BadRequestError` naming the parameter, with the
    parameter and value appended to the message as its `__str__` does."""
    extras = [] if param is None else [f"parameter={param}"]
    if value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return api_error(shape, 400, "BadRequestError", text, param)


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
    # "auto" (a tool parser found the call), "named" or "required" (forced by tool_choice).
    mode: str = "auto"


@dataclass
class ChoicePlan:
    """Everything one output choice will contain."""

    index: int
    content: str
    reasoning: str | None
    finish_reason: str
    completion_tokens: int
    tool_call: ToolCallPlan | None = None
    stop_reason: str | int | None = None
    echo: str = ""  # the prompt (completions) or last message (chat) repeated before the output


@dataclass(frozen=True)
class Extras:
    """What the request asked to get back beside the text (all off by default)."""

    logprobs: int | None = None  # top-k alternatives; chat: set when logprobs=true
    prompt_logprobs: int | None = None
    token_ids: bool = False  # return_token_ids
    prompt_text: str | None = None  # return_prompt_text (chat): the rendered prompt
    prompt_ids: list[int] | None = None  # the prompt's token ids (for return_token_ids)
    prompt: str = ""  # the prompt text (for prompt_logprobs)
    kv_transfer: dict[str, Any] | None = None  # kv_transfer_params sent back
    prompt_details: bool = False  # --enable-prompt-tokens-details


def kv_transfer_reply(sent: Any) -> dict[str, Any] | None:
    """What a prefill instance with a KV connector answers to ``kv_transfer_params``."""
    if not isinstance(sent, dict):
        return None
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [0, 1],
        "remote_engine_id": "fake-engine-0",
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
        "tp_size": 1,
    }


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
    extras: Extras = Extras()

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

    def _prompt_details(self, with_nulls: bool) -> dict[str, Any] | None:
        if not self.extras.prompt_details:
            return None
        if with_nulls:  # the body is dumped whole; the usage chunk without nulls
            return {"cached_tokens": 0, "created_cache_tokens": None, "multimodal_tokens": None}
        return {"cached_tokens": 0}

    def final_usage(self, choices: list[ChoicePlan], with_nulls: bool) -> dict[str, Any]:
        completion = sum(choice.completion_tokens for choice in choices)
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens": completion,
        }
        details = self._reasoning_details(choices)
        prompt_details = self._prompt_details(with_nulls)
        if with_nulls:
            usage["prompt_tokens_details"] = prompt_details
            usage["completion_tokens_details"] = details
        else:
            if prompt_details is not None:
                usage["prompt_tokens_details"] = prompt_details
            if details is not None:
                usage["completion_tokens_details"] = details
        return usage

    def running_usage(self, completion_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        if self.chat:
            # Chat passes the details explicitly (null without a reasoning parser);
            # completions leave the field unset, so it is not serialized at all.
            usage["completion_tokens_details"] = (
                {"reasoning_tokens": reasoning_tokens}
                if self.new and self.reasoning_enabled
                else None
            )
        return usage

    # Token-level extras ---------------------------------------------------------------------

    def chat_logprobs(self, *texts: str) -> dict[str, Any] | None:
        top = self.extras.logprobs
        if top is None:
            return None
        return {"content": [entry for text in texts for entry in chat_logprobs(text, top)]}

    def text_logprobs(self, texts: list[str], offset: int) -> dict[str, Any] | None:
        """Legacy logprobs of consecutive ``texts`` (prompt and output tokenize apart)."""
        top = self.extras.logprobs
        if top is None:
            return None
        merged: dict[str, Any] = {}
        for text in texts:
            part = completion_logprobs(text, top, offset)
            offset += len(text)
            for key, values in part.items():
                merged.setdefault(key, []).extend(values)
        return merged or completion_logprobs("", top, offset)

    def ids(self, *texts: str) -> list[int] | None:
        if not self.extras.token_ids:
            return None
        return [token for text in texts for token in token_ids(text)]

    def _prompt_logprobs(self) -> list[Any] | None:
        top = self.extras.prompt_logprobs
        return None if top is None else prompt_logprobs(self.extras.prompt, top)

    def _prompt_ids(self) -> list[int] | None:
        return self.extras.prompt_ids if self.extras.token_ids else None

    # Non-streaming bodies -------------------------------------------------------------------

    def chat_body(self, choices: list[ChoicePlan]) -> dict[str, Any]:
        out_choices = []
        for choice in choices:
            call = choice.tool_call
            content: str | None = choice.echo + choice.content
            if call is not None:
                # A parser's call leaves no text (null); a forced call gives "" (vLLM's
                # assemble_chat_message_fields), as OpenAI does.
                content = "" if call.mode != "auto" else None
            message: dict[str, Any] = {
                "role": "assistant",
                "content": content,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
            }
            calls = []
            if call is not None:
                calls.append(
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                )
            if calls or not self.new:
                message["tool_calls"] = calls
            message["reasoning" if self.new else "reasoning_content"] = choice.reasoning
            out: dict[str, Any] = {
                "index": choice.index,
                "message": message,
                "logprobs": self.chat_logprobs(*_output_parts(choice)),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
                "token_ids": self.ids(*_output_parts(choice)),
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
        body["prompt_logprobs"] = self._prompt_logprobs()
        body["prompt_token_ids"] = self._prompt_ids()
        if self.new:
            body["prompt_text"] = self.extras.prompt_text
        body["kv_transfer_params"] = self.extras.kv_transfer
        if self.new:
            body["ec_transfer_params"] = None
            body["metrics"] = None
        return body

    def completion_body(self, choices: list[ChoicePlan]) -> dict[str, Any]:
        out_choices = []
        for choice in choices:
            text = choice.echo + choice.content
            out: dict[str, Any] = {
                "index": choice.index,
                "text": text,
                "logprobs": self.text_logprobs([choice.echo, choice.content], 0),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
                "token_ids": self.ids(choice.content),
                "prompt_logprobs": self._prompt_logprobs(),
                "prompt_token_ids": self._prompt_ids(),
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
        body["kv_transfer_params"] = self.extras.kv_transfer
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
        chunk["prompt_token_ids"] = self._prompt_ids()
        if self.new:
            chunk["prompt_text"] = self.extras.prompt_text
        return chunk

    def echo_chunk(self, index: int, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._chunk(choice, usage)

    def delta_chunk(
        self, index: int, delta: dict[str, Any], text: str, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        """A chunk of output ``text`` (what its tokens decode to, for logprobs and ids)."""
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self.chat_logprobs(text),
            "finish_reason": None,
            "token_ids": self.ids(text),
        }
        chunk = self._chunk(choice, usage)
        if self.new:
            chunk["kv_transfer_params"] = None
        return chunk

    def finish_chunk(
        self,
        choice_plan: ChoicePlan,
        delta: dict[str, Any],
        text: str,
        usage: dict[str, Any] | None,
        fingerprint: bool,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": choice_plan.index,
            "delta": delta,
            "logprobs": self.chat_logprobs(text),
            "finish_reason": choice_plan.finish_reason,
            "stop_reason": choice_plan.stop_reason,
            "token_ids": self.ids(text),
        }
        if self.new:
            choice["weight_versions"] = None
        chunk = self._chunk(choice, usage)
        if self.new:
            if fingerprint:
                chunk["system_fingerprint"] = self.fingerprint
            chunk["kv_transfer_params"] = self.extras.kv_transfer
        return chunk

    def text_chunk(
        self,
        choice_plan: ChoicePlan,
        text: str,
        offset: int,
        first: bool,
        last: bool,
        usage: dict[str, Any] | None,
        fingerprint: bool,
    ) -> dict[str, Any]:
        """One completions chunk: ``text`` starts at ``offset`` of the choice's text (the
        echoed prompt leads the first chunk)."""
        output = text[len(choice_plan.echo) :] if first else text
        choice: dict[str, Any] = {
            "index": choice_plan.index,
            "text": text,
            "logprobs": self.text_logprobs([text[: len(text) - len(output)], output], offset),
            "finish_reason": choice_plan.finish_reason if last else None,
            "stop_reason": choice_plan.stop_reason if last else None,
            "prompt_token_ids": self._prompt_ids() if first else None,
            "token_ids": self.ids(output),
        }
        if self.new:
            choice["weight_versions"] = None
        chunk = self._chunk(choice, usage)
        if self.new:
            if last and fingerprint:
                chunk["system_fingerprint"] = self.fingerprint
            chunk["kv_transfer_params"] = self.extras.kv_transfer if last else None
        return chunk

    def usage_chunk(self, choices: list[ChoicePlan]) -> dict[str, Any]:
        chunk = self._head(chunk=True)
        chunk["choices"] = []
        chunk["usage"] = self.final_usage(choices, with_nulls=False)
        if self.new:
            chunk["system_fingerprint"] = self.fingerprint
        return chunk


def _output_parts(choice: ChoicePlan) -> list[str]:
    """The texts the choice's tokens decode to (what logprobs and token ids describe)."""
    call = choice.tool_call
    return [choice.reasoning or "", call.arguments if call is not None else choice.content]


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
