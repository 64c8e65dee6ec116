"""Property: `StreamAccumulator.response()`'s fast path for the usual reply (one chat choice of
text alone) gives what the general `_response()` gives, byte for byte (key order included),
and leaves the fold as it was (a second call, or more chunks after it, see the same state)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_middleware._reassembly import StreamAccumulator

from .test_reassembly_fold import chunks, common, usage

_HEAD = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def agree(sequence: list[Any], chat: bool, forced: bool) -> None:
    acc = StreamAccumulator(chat, 0.0, forced)
    for chunk in sequence:
        acc.add(copy.deepcopy(chunk))
        general = orjson.dumps(acc._response())
        general_media = acc.may_hold_media
        assert orjson.dumps(acc.response()) == general
        assert acc.may_hold_media == general_media
        assert orjson.dumps(acc.response()) == general  # the fold is untouched


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sequence=st.lists(st.one_of(chunks, common, common), max_size=8),
    chat=st.booleans(),
    forced=st.booleans(),
)
def test_fast_path_equals_the_general_response(
    sequence: list[Any], chat: bool, forced: bool
) -> None:
    agree(sequence, chat, forced)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sequence=st.lists(common, min_size=1, max_size=12),
    usage_chunk=usage,
    prompt_ids=st.booleans(),
    usage_first=st.booleans(),
    no_object=st.booleans(),
)
def test_usual_streams_take_the_fast_path_and_agree(
    sequence: list[Any], usage_chunk: Any, prompt_ids: bool, usage_first: bool, no_object: bool
) -> None:
    first: dict[str, Any] = {**_HEAD, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    if usage_first:  # "usage" before "choices" in the folded fields: the copy is reordered
        first = {"usage": None, **first}
    if prompt_ids:  # a vLLM 0.10 stream: the response carries `tool_calls: []`
        first["prompt_token_ids"] = [1, 2]
    last = {**_HEAD, "choices": [], "usage": usage_chunk}
    sequence = [
        first,
        *[{**chunk, "choices": [chunk["choices"][0] | {"index": 0}]} for chunk in sequence],
        last,
    ]
    if no_object:  # the response adds "object" before "choices": the copy is reordered
        sequence = [{k: v for k, v in chunk.items() if k != "object"} for chunk in sequence]
    agree(sequence, True, False)
    acc = StreamAccumulator(True, 0.0)
    for chunk in sequence:
        acc.add(copy.deepcopy(chunk))
    response = acc.response()
    assert list(response)[-2:] == ["choices", "usage"]
    assert ("tool_calls" in response["choices"][0]["message"]) is prompt_ids


def test_fast_path_is_taken_for_the_usual_reply(monkeypatch: Any) -> None:
    acc = StreamAccumulator(True, 0.0)
    acc.add({**_HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    acc.add(
        {**_HEAD, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    )
    acc.add({**_HEAD, "choices": [], "usage": {"total_tokens": 3}})
    monkeypatch.setattr(StreamAccumulator, "_response", None)  # the general path would fail
    assert acc.response() == {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"total_tokens": 3},
    }
    assert acc.may_hold_media is False
