"""Turns one request body into what the fake vLLM server will send back.

Validation runs in the order vLLM runs it (model, schema, limits) and raises
:class:`FakeHTTPError`; success yields a :class:`Prepared` holding either the full body or the
list of stream events, so the HTTP layer only has to write bytes and sleep.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._fake_checks import (
    Settings,
    check_model,
    check_tools,
    choice_count,
    cut_at_stop,
    int_field,
    invalid,
    new_response_id,
    read_prompts,
    request_extras,
    stream_flags,
    token_budget,
)
from ._fake_text import (
    REASONING_TEXT,
    Triggers,
    content_text,
    count_tokens,
    fake_reply,
    fake_tool_arguments,
    mentions_weather,
    parse_triggers,
    split_text,
    tool_name,
)
from ._fake_wire import (
    ChoicePlan,
    ToolCallPlan,
    Wire,
    dumps,
    midstream_error_event,
    validation_error,
)


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Send:
    payload: bytes
    tag: str  # role | content | finish | usage | error | done


@dataclass(frozen=True)
class Drop:
    pass


Event = Sleep | Send | Drop

DONE = Send(b"data: [DONE]\n\n", "done")


@dataclass
class Prepared:
    stream: bool
    triggers: Triggers
    body: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    delay: float = 0.0


def _sse(obj: Any, tag: str) -> Send:
    return Send(b"data: " + dumps(obj) + b"\n\n", tag)


def _pick_tool(
    tools: list[Mapping[str, Any]], choice: Any, last_role: Any, text: str
) -> Mapping[str, Any] | None:
    if not tools or choice == "none":
        return None
    if isinstance(choice, Mapping):
        function = choice.get("function")
        wanted = function.get("name") if isinstance(function, Mapping) else None
        return next(tool for tool in tools if tool_name(tool) == wanted)
    if choice == "required":
        return tools[0]
    # "auto": only answer a user turn, so a conversation ending in a tool result gets text.
    if last_role == "user" and mentions_weather(text):
        return tools[0]
    return None


def _rendered_prompt(messages: list[Mapping[str, Any]]) -> str:
    """A stand-in for the chat template's output (``return_prompt_text``)."""
    turns = [f"<|{m.get('role')}|>{content_text(m.get('content'))}" for m in messages]
    return "".join(turns) + "<|assistant|>"


def prepare_chat(s: Settings, body: Mapping[str, Any], headers: Mapping[str, str]) -> Prepared:
    model = check_model(s, body)
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(message, Mapping) for message in messages)
    ):
        raise validation_error(s.flavor, s.error_shape, "Field required: messages", "body.messages")
    stream, include_usage, continuous = stream_flags(s, body)
    tools, tool_choice = check_tools(s, body)
    n = choice_count(s, body)
    requested = int_field(s, body, "max_completion_tokens", None)
    if requested is None:
        requested = int_field(s, body, "max_tokens", None)
    prompt = " ".join(content_text(m.get("content")) for m in messages)
    prompt_tokens = sum(count_tokens(content_text(m.get("content"))) for m in messages)
    extras = request_extras(s, body, True, prompt, _rendered_prompt(messages))
    max_tokens = token_budget(s, requested, prompt_tokens, "messages")
    text = next(
        (content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
        "",
    )
    last = messages[-1]
    # echo repeats the last message when it has the role being answered (vLLM's rule).
    echo = (
        content_text(last.get("content"))
        if body.get("echo") and last.get("role") == "assistant"
        else ""
    )
    tool = _pick_tool(tools, tool_choice, last.get("role"), text)
    mode = (
        "named"
        if isinstance(tool_choice, Mapping)
        else "required"
        if tool_choice == "required"
        else "auto"
    )
    choices = []
    for index in range(n):
        if tool is None:
            reply = fake_reply(text, index=index, max_tokens=max_tokens, reasoning=s.reasoning)
            content, stop_reason = cut_at_stop(body, reply.content)
            finish = "stop" if content != reply.content else reply.finish_reason
            if finish != "stop":
                stop_reason = None
            tokens = count_tokens(reply.reasoning or "") + count_tokens(content)
            plan = ChoicePlan(
                index, content, reply.reasoning, finish, tokens, None, stop_reason, echo
            )
            choices.append(plan)
            continue
        name = tool_name(tool)
        arguments = fake_tool_arguments(tool, text)
        reasoning = REASONING_TEXT if s.reasoning else None
        tokens = count_tokens(reasoning or "") + count_tokens(name) + count_tokens(arguments)
        call_id = "chatcmpl-tool-" + secrets.token_hex(8 if s.new else 16)
        call = ToolCallPlan(call_id, name, arguments, mode)
        # A forced single named tool finishes with "stop", as OpenAI reports it
        # (resolve_finish_reason); a parser's call or "required" with "tool_calls".
        finish = "stop" if mode == "named" else "tool_calls"
        choices.append(ChoicePlan(index, "", reasoning, finish, tokens, call))
    wire = Wire(
        s.flavor,
        new_response_id(s, "chatcmpl-", headers, body),
        _now(),
        model,
        True,
        prompt_tokens,
        s.reasoning,
        extras,
    )
    return _finish(s, wire, choices, parse_triggers(text), stream, include_usage, continuous)


def prepare_completion(
    s: Settings, body: Mapping[str, Any], headers: Mapping[str, str]
) -> Prepared:
    model = check_model(s, body)
    prompts = read_prompts(s, body.get("prompt"))
    stream, include_usage, continuous = stream_flags(s, body)
    if stream and body.get("use_beam_search"):
        raise invalid(s, "Streaming is not currently supported with beam search", "stream")
    n = choice_count(s, body)
    # Completions default to 16 tokens when max_tokens is absent; an explicit null means "up to
    # the context limit".
    requested = int_field(s, body, "max_tokens", 16)
    all_text = " ".join(text for text, _ in prompts)
    extras = request_extras(s, body, False, prompts[0][0], None)
    echo = bool(body.get("echo"))
    choices = []
    for prompt_index, (text, prompt_tokens) in enumerate(prompts):
        max_tokens = token_budget(s, requested, prompt_tokens, "prompt")
        for variant in range(n):
            reply = fake_reply(text, index=variant, max_tokens=max_tokens)
            content, stop_reason = cut_at_stop(body, reply.content)
            finish = "stop" if content != reply.content else reply.finish_reason
            if finish != "stop":
                stop_reason = None
            choices.append(
                ChoicePlan(
                    variant + prompt_index * n,
                    content,
                    None,
                    finish,
                    count_tokens(content),
                    None,
                    stop_reason,
                    text if echo else "",
                )
            )
    wire = Wire(
        s.flavor,
        new_response_id(s, "cmpl-", headers, body),
        _now(),
        model,
        False,
        sum(tokens for _, tokens in prompts),
        extras=extras,
    )
    triggers = parse_triggers(all_text)
    return _finish(s, wire, choices, triggers, stream, include_usage, continuous)


def _now() -> int:
    return int(time.time())


def _finish(
    s: Settings,
    wire: Wire,
    choices: list[ChoicePlan],
    triggers: Triggers,
    stream: bool,
    include_usage: bool,
    continuous: bool,
) -> Prepared:
    first_delay = s.first_token_delay + triggers.slow
    if not stream:
        body = wire.chat_body(choices) if wire.chat else wire.completion_body(choices)
        longest = max(len(split_text(s.chunker, c.content or "")) for c in choices)
        delay = first_delay + s.token_delay * max(0, longest - 1)
        return Prepared(False, triggers, body=body, delay=delay)
    events: list[Event] = []
    if first_delay > 0:
        events.append(Sleep(first_delay))
    queues: list[deque[Send]] = []
    for choice in choices:
        if wire.chat:
            usage = wire.running_usage(0, 0) if continuous else None
            events.append(_sse(wire.role_chunk(choice.index, usage), "role"))
            queues.append(deque(_chat_items(s, wire, choice, include_usage, continuous)))
        else:
            queues.append(deque(_text_items(s, wire, choice, include_usage, continuous)))
    if wire.chat:
        # The echoed message follows the role chunks, before any output.
        for choice in choices:
            if choice.echo:
                usage = wire.running_usage(0, 0) if continuous else None
                events.append(_sse(wire.echo_chunk(choice.index, choice.echo, usage), "role"))
    first_round = True
    while any(queues):
        if not first_round and s.token_delay > 0:
            events.append(Sleep(s.token_delay))
        first_round = False
        # One chunk per choice per round interleaves n>1 choices the way vLLM does.
        events.extend(queue.popleft() for queue in queues if queue)
    if include_usage:
        events.append(_sse(wire.usage_chunk(choices), "usage"))
    if triggers.midstream_error or triggers.drop:
        events = cut_midway(events)
        if triggers.drop:
            events.append(Drop())
        else:
            event = midstream_error_event(s.flavor, s.error_shape)
            events.append(Send(b"data: " + event + b"\n\n", "error"))
            events.append(DONE)
    else:
        events.append(DONE)
    return Prepared(True, triggers, events=events)


def cut_midway(events: list[Event]) -> list[Event]:
    """Keep the role chunks and about half of the content chunks."""
    content = [i for i, e in enumerate(events) if isinstance(e, Send) and e.tag == "content"]
    if content:
        return events[: content[max(1, len(content) // 2) - 1] + 1]
    cut = next(
        (i for i, e in enumerate(events) if isinstance(e, Send) and e.tag != "role"), len(events)
    )
    return events[:cut]


def _chat_items(
    s: Settings, wire: Wire, choice: ChoicePlan, include_usage: bool, continuous: bool
) -> list[Send]:
    """The chunks of one choice after its role chunk: (delta, text) pairs, the last of which
    the finish chunk carries when the engine's last step produced it (a length cut)."""
    reasoning_tokens = 0

    def usage(tokens: int) -> dict[str, Any] | None:
        return wire.running_usage(tokens, reasoning_tokens) if continuous else None

    steps: list[tuple[dict[str, Any], str, int]] = []  # delta, its text, tokens so far
    index = choice.index
    base = 0
    if choice.reasoning:
        key = "reasoning" if s.new else "reasoning_content"
        so_far = ""
        for piece in split_text(s.chunker, choice.reasoning):
            so_far += piece
            steps.append(({key: piece}, piece, count_tokens(so_far)))
        base = count_tokens(choice.reasoning)
    call = choice.tool_call
    if call is not None:
        steps += _tool_steps(s, call, base)
    else:
        so_far = ""
        for piece in split_text(s.chunker, choice.content):
            so_far += piece
            steps.append(({"content": piece}, piece, base + count_tokens(so_far)))
    if choice.finish_reason == "length" and steps:
        last_delta, last_text, _ = steps.pop()
    elif call is None and not s.reasoning:
        last_delta, last_text = {"content": ""}, ""  # the EOS token decodes to nothing
    else:
        last_delta, last_text = {}, ""  # a parser has nothing left to say
    items: list[Send] = []
    reasoning_total = count_tokens(choice.reasoning or "")
    for delta, text, tokens in steps:
        reasoning_tokens = min(tokens, reasoning_total)
        items.append(_sse(wire.delta_chunk(index, delta, text, usage(tokens)), "content"))
    reasoning_tokens = reasoning_total
    finish = wire.finish_chunk(
        choice, last_delta, last_text, usage(choice.completion_tokens), not include_usage
    )
    items.append(_sse(finish, "finish"))
    return items


def _tool_steps(
    s: Settings, call: ToolCallPlan, base: int
) -> list[tuple[dict[str, Any], str, int]]:
    """The deltas of one tool call, per parser (section 3 and vLLM's tool_parsers)."""
    fragments = split_text(s.chunker, call.arguments)
    tokens = base + count_tokens(call.name)
    steps: list[tuple[dict[str, Any], str, int]] = []
    head = {"id": call.call_id, "type": "function", "index": 0}
    if call.mode != "auto":
        # Forced calls are built by vLLM itself: no content key, and the first delta names the
        # call and carries the first argument text; "required" sends an explicit null name on
        # the later ones.
        so_far = fragments.pop(0) if fragments else ""
        first = {**head, "function": {"name": call.name, "arguments": so_far}}
        steps.append(({"tool_calls": [first]}, so_far, tokens + count_tokens(so_far)))
        for fragment in fragments:
            so_far += fragment
            function: dict[str, Any] = {"arguments": fragment}
            if call.mode == "required":
                function = {"name": None, "arguments": fragment}
            delta = {"tool_calls": [{"index": 0, "function": function}]}
            steps.append((delta, fragment, tokens + count_tokens(so_far)))
        return steps
    # A tool parser (hermes): v0.33 sends an explicit null content on tool deltas.
    lead: dict[str, Any] = {"content": None} if s.new else {}
    name_entry = {**head, "function": {"name": call.name}}
    so_far = ""
    if s.merge_tool_name_delta and fragments:
        so_far = fragments.pop(0)
        entries = [name_entry, {"index": 0, "function": {"arguments": so_far}}]
    else:
        entries = [name_entry]
    steps.append(({**lead, "tool_calls": entries}, so_far, tokens + count_tokens(so_far)))
    for fragment in fragments:
        so_far += fragment
        delta = {**lead, "tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
        steps.append((delta, fragment, tokens + count_tokens(so_far)))
    return steps


def _text_items(
    s: Settings, wire: Wire, choice: ChoicePlan, include_usage: bool, continuous: bool
) -> list[Send]:
    pieces = split_text(s.chunker, choice.content) or [""]
    if choice.echo:
        pieces[0] = choice.echo + pieces[0]
    items: list[Send] = []
    so_far = ""
    offset = 0
    for position, piece in enumerate(pieces):
        first = position == 0
        last = position == len(pieces) - 1
        output = piece[len(choice.echo) :] if first else piece
        so_far += output
        usage = wire.running_usage(count_tokens(so_far), 0) if continuous else None
        chunk = wire.text_chunk(choice, piece, offset, first, last, usage, not include_usage)
        offset += len(piece)
        items.append(_sse(chunk, "finish" if last else "content"))
    return items
