"""Property: `StreamAccumulator`'s fold gives what the generic per-key fold gives, for any
sequence of chunks (null fields, several choices, tool calls, logprobs, usage chunks, bad
shapes), the response byte for byte (key order included) and each step's answers."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_middleware._reassembly import StreamAccumulator

from ._reference_fold import ReferenceAccumulator

texts = st.text(max_size=6)
scalars = st.one_of(st.none(), st.integers(-3, 3), texts, st.booleans())


def fields(spec: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts of some of `spec`'s keys, in any order (the server's order is not fixed)."""
    keys = st.lists(st.sampled_from(sorted(spec)), unique=True)
    return keys.flatmap(
        lambda chosen: st.tuples(*(spec[key] for key in chosen)).map(
            lambda values: dict(zip(chosen, values, strict=True))
        )
    )


tool_calls = st.lists(
    st.one_of(
        fields(
            {
                "index": st.one_of(st.integers(0, 2), st.none(), texts),
                "id": st.one_of(st.none(), texts),
                "type": st.one_of(st.none(), st.just("function")),
                "function": st.one_of(
                    st.none(),
                    fields(
                        {
                            "name": st.one_of(st.none(), texts),
                            "arguments": st.one_of(st.none(), texts),
                        }
                    ),
                ),
            }
        ),
        scalars,
    ),
    max_size=3,
)
deltas = st.one_of(
    # The usual shape: content alone.
    st.builds(lambda text: {"content": text}, texts),
    fields(
        {
            "role": st.one_of(st.none(), st.just("assistant")),
            "content": st.one_of(st.none(), texts, st.integers(-9, 99)),
            "reasoning": st.one_of(st.none(), texts),
            "reasoning_content": st.one_of(st.none(), texts),
            "tool_calls": st.one_of(st.none(), tool_calls),
            "refusal": st.one_of(st.none(), texts),
            "audio": st.one_of(st.none(), st.just({"id": "a", "data": "QUJD"})),
            "other": scalars,
        }
    ),
    scalars,
)
chat_logprobs = st.one_of(
    st.none(),
    st.builds(lambda n: {"content": [{"token": "t", "logprob": -0.5}] * n}, st.integers(0, 2)),
)
completion_logprobs = st.one_of(
    st.none(),
    fields(
        {
            "tokens": st.lists(texts, max_size=2),
            "text_offset": st.lists(st.integers(-9, 99), max_size=2),
        }
    ),
)
choices = fields(
    {
        "index": st.one_of(st.integers(0, 2), st.none(), st.just("1")),
        "delta": deltas,
        "text": st.one_of(st.none(), texts, st.integers(-9, 99)),
        "logprobs": st.one_of(chat_logprobs, completion_logprobs, st.integers(-9, 99)),
        "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls"])),
        "stop_reason": scalars,
        "token_ids": st.one_of(
            st.none(), st.lists(st.integers(0, 9), max_size=3), st.integers(-9, 99)
        ),
        "weight_versions": scalars,
    }
)
usage = st.one_of(
    st.none(),
    st.builds(
        lambda p, c: {"prompt_tokens": p, "completion_tokens": c},
        st.integers(0, 9),
        st.integers(0, 9),
    ),
)
chunks = fields(
    {
        "id": st.one_of(st.none(), st.just("chatcmpl-1")),
        "object": st.one_of(
            st.none(), st.just("chat.completion.chunk"), st.just("text_completion")
        ),
        "created": st.one_of(st.none(), st.integers(0, 9)),
        "model": st.one_of(st.none(), texts),
        "choices": st.one_of(st.lists(st.one_of(choices, scalars), max_size=3), st.none(), texts),
        "usage": usage,
        "system_fingerprint": st.one_of(st.none(), texts),
        "kv_transfer_params": scalars,
        "prompt_token_ids": st.one_of(st.none(), st.lists(st.integers(0, 9), max_size=2)),
        "prompt_text": st.one_of(st.none(), texts),
    }
)


def vllm_like(index: int, text: str, finish: str | None, nulls: bool) -> dict[str, Any]:
    """The common shape (vLLM 0.33 with `nulls`, the lean bench shape without)."""
    choice: dict[str, Any] = {"index": index, "delta": {"content": text}, "logprobs": None}
    choice["finish_reason"] = finish
    if nulls:
        choice["token_ids"] = None
    chunk: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
    }
    chunk["choices"] = [choice]
    if nulls:
        chunk["kv_transfer_params"] = None
    return chunk


common = st.builds(
    vllm_like, st.integers(0, 1), texts, st.one_of(st.none(), st.just("stop")), st.booleans()
)


def check(sequence: list[Any], chat: bool, forced: bool) -> None:
    fast = StreamAccumulator(chat, 0.0, forced)
    reference = ReferenceAccumulator(chat, 0.0, forced)
    for chunk in sequence:
        # Each its own copy: a fold that changed its input would show.
        mine, theirs = copy.deepcopy(chunk), copy.deepcopy(chunk)
        assert fast.add(mine) == reference.add(theirs)
        assert mine == chunk
        assert (fast.ttft_ms is None) == (reference.ttft_ms is None)
        assert fast.all_finished() == reference.all_finished()
    assert fast.chunks == reference.chunks
    assert fast.usage == reference.usage
    assert orjson.dumps(fast.response()) == orjson.dumps(reference.response())


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sequence=st.lists(st.one_of(chunks, common, common), max_size=8),
    chat=st.booleans(),
    forced=st.booleans(),
)
def test_fold_equals_the_generic_fold(sequence: list[Any], chat: bool, forced: bool) -> None:
    check(sequence, chat, forced)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(sequence=st.lists(common, min_size=1, max_size=30), usage_chunk=usage, chat=st.booleans())
def test_common_streams_equal_the_generic_fold(
    sequence: list[Any], usage_chunk: Any, chat: bool
) -> None:
    first = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    first["choices"] = [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    first["prompt_token_ids"] = None
    last = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}
    last["usage"] = usage_chunk
    last["system_fingerprint"] = "fp"
    check([first, *sequence, last], chat, False)
