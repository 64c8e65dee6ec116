"""Reading one request body as vLLM does: model, schema and limit checks, in vLLM's order.

Each check raises :class:`FakeHTTPError` with the body the flavour answers (v0.33: request
model validators raise `VLLMValidationError`, answered as BadRequestError naming the parameter).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._fake_text import Chunker, count_tokens, tool_name
from ._fake_tokens import token_ids
from ._fake_wire import (
    ErrorShape,
    Extras,
    FakeHTTPError,
    Flavor,
    api_error,
    kv_transfer_reply,
    validation_error,
    vllm_validation_error,
)


@dataclass(frozen=True)
class Settings:
    """The server configuration, read once per request."""

    flavor: Flavor
    model: str
    error_shape: ErrorShape
    max_model_len: int
    reasoning: bool
    chunker: Chunker | None
    first_token_delay: float
    token_delay: float
    merge_tool_name_delta: bool
    prompt_tokens_details: bool = False

    @property
    def new(self) -> bool:
        return self.flavor == "v0.33"


def invalid(
    s: Settings, message: str, param: str, loc: str = "body", value: Any = None
) -> FakeHTTPError:
    """A request model validator's rejection: v0.33 raises `VLLMValidationError` (answered as
    BadRequestError naming `param`); v0.10.2 raised ValueError (a pydantic "Value error")."""
    if s.new:
        return vllm_validation_error(s.error_shape, message, param, value)
    return validation_error(s.flavor, s.error_shape, f"Value error, {message}", loc)


def check_model(s: Settings, body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return s.model
    if model != s.model:
        if s.new:
            message = f"The model `{model}` does not exist. Valid aliases: {s.model}."
            raise api_error(s.error_shape, 404, "NotFoundError", message, "model")
        raise api_error(s.error_shape, 404, "NotFoundError", f"The model `{model}` does not exist.")
    return s.model


def new_response_id(
    s: Settings, prefix: str, headers: Mapping[str, str], body: Mapping[str, Any]
) -> str:
    header_id = headers.get("x-request-id")
    if header_id:
        return prefix + header_id
    body_id = body.get("request_id")
    if isinstance(body_id, str) and body_id:
        return prefix + body_id
    return prefix + secrets.token_hex(8 if s.new else 16)


class StreamFlags(NamedTuple):
    """How a request asked to be answered: streamed or not, and the usage in the stream."""

    stream: bool
    include_usage: bool  # a usage chunk at the end
    continuous: bool  # usage in every chunk too


def stream_flags(s: Settings, body: Mapping[str, Any]) -> StreamFlags:
    stream = bool(body.get("stream") or False)
    options = body.get("stream_options")
    if options and not stream:
        raise invalid(s, "Stream options can only be defined when `stream=True`.", "stream_options")
    if not stream or not isinstance(options, Mapping):
        return StreamFlags(stream, False, False)
    include_usage = options.get("include_usage")
    if include_usage is None:
        include_usage = not s.new  # the default flipped from True (v0.10) to False (v0.33)
    continuous = bool(include_usage) and bool(options.get("continuous_usage_stats") or False)
    return StreamFlags(stream, bool(include_usage), continuous)


def int_field(s: Settings, body: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        message = f"Input should be a valid non-negative integer: {key}"
        raise validation_error(s.flavor, s.error_shape, message, f"body.{key}")
    return value


def choice_count(s: Settings, body: Mapping[str, Any]) -> int:
    n = int_field(s, body, "n", 1)
    if n is None:
        return 1
    if n < 1:
        # The request models accept it; SamplingParams rejects it later.
        message = f"n must be at least 1, got {n}."
        if s.new:
            raise api_error(s.error_shape, 400, "BadRequestError", message)
        raise validation_error(s.flavor, s.error_shape, message, "body.n")
    return n


def token_budget(s: Settings, requested: int | None, prompt_tokens: int, what: str) -> int:
    limit = s.max_model_len
    if prompt_tokens > limit:
        if s.new:
            message = (
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains {prompt_tokens} input tokens, which exceeds this limit even without "
                "any output tokens. Please reduce the length of the input prompt."
            )
            raise api_error(s.error_shape, 400, "BadRequestError", message, "input_tokens")
        message = (
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens} tokens in the {what}, Please reduce the length of the {what}."
        )
        raise api_error(s.error_shape, 400, "BadRequestError", message)
    if requested is None:
        return limit - prompt_tokens
    if s.new and requested > limit:
        message = (
            f"max_tokens={requested} cannot be greater than max_model_len={limit}. "
            "Please request fewer output tokens."
        )
        raise api_error(s.error_shape, 400, "BadRequestError", message, "max_tokens")
    if requested + prompt_tokens > limit:
        if s.new:
            return limit - prompt_tokens  # v0.33 clamps silently
        message = (
            f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
            f"maximum context length is {limit} tokens and your request has {prompt_tokens} "
            f"input tokens ({requested} > {limit} - {prompt_tokens})."
        )
        raise api_error(s.error_shape, 400, "BadRequestError", message)
    return requested


def check_tools(s: Settings, body: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], Any]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is not None and (not isinstance(tools, list) or not tools):
        raise invalid(
            s,
            "`tools` must not be an empty array. Either provide at least one tool or omit "
            "the field entirely.",
            "tools",
        )
    valid = [tool for tool in tools or [] if isinstance(tool, Mapping)]
    if choice is None or choice == "none":
        return valid, choice
    if not valid:
        raise invalid(s, "When using `tool_choice`, `tools` must be set.", "tool_choice")
    if choice in ("auto", "required"):
        return valid, choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        wanted = function.get("name") if isinstance(function, Mapping) else None
        if not any(tool_name(tool) == wanted for tool in valid):
            raise invalid(
                s,
                "The tool specified in `tool_choice` does not match any of the specified `tools`",
                "tool_choice",
            )
        return valid, choice
    raise invalid(
        s,
        f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or '
        '"required" are supported.',
        "tool_choice",
    )


def logprob_extras(
    s: Settings, body: Mapping[str, Any], chat: bool
) -> tuple[int | None, int | None]:
    """(top-k logprobs, prompt logprobs) asked for, after vLLM's checks."""
    stream = bool(body.get("stream"))
    for key in ("prompt_logprobs", "top_logprobs"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid(s, f"`{key}` must be an integer.", key, value=value)
    prompt = body.get("prompt_logprobs")
    if prompt is not None:
        if stream and (prompt > 0 or prompt == -1):
            raise invalid(
                s, "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
            )
        if prompt < 0 and prompt != -1:
            raise invalid(
                s,
                "`prompt_logprobs` must be a positive value or -1.",
                "prompt_logprobs",
                value=prompt,
            )
    if chat:
        top = body.get("top_logprobs")
        if top is not None and top < 0 and top != -1:
            raise invalid(
                s, "`top_logprobs` must be a positive value or -1.", "top_logprobs", value=top
            )
        if top is not None and (top == -1 or top > 0) and not body.get("logprobs"):
            raise invalid(
                s, "when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs"
            )
        wanted = (max(top or 0, 0) or 1) if body.get("logprobs") else None
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
            raise invalid(s, "`logprobs` must be an integer.", "logprobs", value=logprobs)
        if logprobs is not None and logprobs < 0 and logprobs != -1:
            raise invalid(
                s, "`logprobs` must be a positive value or -1.", "logprobs", value=logprobs
            )
        wanted = None if logprobs is None else max(logprobs, 1)
    return wanted, (None if prompt is None else max(prompt, 1))


def request_extras(
    s: Settings, body: Mapping[str, Any], chat: bool, prompt: str, prompt_text: str | None
) -> Extras:
    top, prompt_top = logprob_extras(s, body, chat)
    return Extras(
        logprobs=top,
        prompt_logprobs=prompt_top,
        token_ids=bool(body.get("return_token_ids")),
        prompt_text=prompt_text if chat and body.get("return_prompt_text") else None,
        prompt_ids=token_ids(prompt),
        prompt=prompt,
        kv_transfer=kv_transfer_reply(body.get("kv_transfer_params")),
        prompt_details=s.prompt_tokens_details,
    )


def cut_at_stop(body: Mapping[str, Any], text: str) -> tuple[str, str | int | None]:
    """Cut ``text`` at the first stop string it contains; (kept text, stop_reason).

    Without a stop string, a request naming ``stop_token_ids`` ends on the first of them.
    """
    stop = body.get("stop")
    strings = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    hits = [(text.find(item), item) for item in strings if isinstance(item, str) and item]
    hits = [(position, item) for position, item in hits if position >= 0]
    if hits:
        position, item = min(hits)
        return text[:position], item
    ids = body.get("stop_token_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], int):
        return text, ids[0]
    return text, None


def read_prompts(s: Settings, prompt: Any) -> list[tuple[str, int]]:
    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(item, int) and not isinstance(item, bool) for item in value
        )

    if prompt is None or prompt == "":
        raise invalid(s, "Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    prompts: list[tuple[str, int]] | None = None
    if isinstance(prompt, str):
        prompts = [(prompt, count_tokens(prompt))]
    elif isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            prompts = [(item, count_tokens(item)) for item in prompt]
        elif is_ids(prompt):
            prompts = [(" ".join(map(str, prompt)), len(prompt))]
        elif all(is_ids(item) and item for item in prompt):
            prompts = [(" ".join(map(str, item)), len(item)) for item in prompt]
    if not prompts:
        raise validation_error(
            s.flavor, s.error_shape, "Input should be a valid string or list", "body.prompt"
        )
    return prompts


def parse_json_body(settings: Settings, headers: Mapping[str, str], raw: bytes) -> Any:
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise validation_error(
            settings.flavor,
            settings.error_shape,
            "Unsupported Media Type: Only 'application/json' is allowed",
        )
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise validation_error(
            settings.flavor, settings.error_shape, f"JSON decode error: {exc}", "body"
        ) from None
    if not isinstance(body, dict):
        raise validation_error(
            settings.flavor, settings.error_shape, "Input should be a valid dictionary", "body"
        )
    return body
