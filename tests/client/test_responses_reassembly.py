"""Properties of the Responses API reassembly (pure: no server)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from vllm_middleware._responses_reassembly import ResponsesAccumulator

texts = st.lists(st.text(min_size=0, max_size=8), min_size=0, max_size=12)


def events_for(messages: list[list[str]], arguments: list[str]) -> list[dict[str, Any]]:
    """The events a server sends for message items of the given text pieces, then one
    function call with the given argument pieces, ending in response.completed."""
    seq = 0
    out: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        nonlocal seq
        out.append({"type": kind, "sequence_number": seq, **fields})
        seq += 1

    base = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    emit("response.created", response=base)
    final_items = []
    for index, pieces in enumerate(messages):
        item_id = f"msg_{index}"
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress"}
        emit("response.output_item.added", output_index=index, item={**item, "content": []})
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        emit("response.content_part.added", **where, part=part)
        for piece in pieces:
            emit("response.output_text.delta", **where, delta=piece)
        done_part = {**part, "text": "".join(pieces)}
        emit("response.content_part.done", **where, part=done_part)
        done = {**item, "status": "completed", "content": [done_part]}
        emit("response.output_item.done", output_index=index, item=done)
        final_items.append(done)
    index = len(messages)
    call = {"id": "fc_1", "type": "function_call", "name": "f", "call_id": "c1", "arguments": ""}
    emit("response.output_item.added", output_index=index, item=call)
    for piece in arguments:
        emit(
            "response.function_call_arguments.delta",
            output_index=index,
            item_id="fc_1",
            delta=piece,
        )
    final_call = {**call, "arguments": "".join(arguments), "status": "completed"}
    emit("response.output_item.done", output_index=index, item=final_call)
    final_items.append(final_call)
    emit("response.completed", response={**base, "status": "completed", "output": final_items})
    return out


def fold(events: list[dict[str, Any]]) -> ResponsesAccumulator:
    acc = ResponsesAccumulator(0.0)
    for event in events:
        acc.add(copy.deepcopy(event))
    return acc


@given(st.lists(texts, min_size=1, max_size=3), texts)
def test_completed_event_is_the_record(messages: list[list[str]], arguments: list[str]) -> None:
    events = events_for(messages, arguments)
    acc = fold(events)
    assert acc.all_finished() and acc.chunks == len(events)
    assert acc.response() == events[-1]["response"]


@given(st.lists(texts, min_size=1, max_size=3), texts, st.data())
def test_a_cut_stream_keeps_every_delta_that_arrived(
    messages: list[list[str]], arguments: list[str], data: st.DataObject
) -> None:
    events = events_for(messages, arguments)
    cut = data.draw(st.integers(min_value=1, max_value=len(events) - 1))
    acc = fold(events[:cut])
    assert not acc.all_finished()
    response = acc.response()
    assert response is not None and response["status"] == "incomplete"
    # Per output item: the text (and arguments) that arrived, in order, nothing else.
    arrived: dict[int, str] = {}
    done: dict[int, dict[str, Any]] = {}
    for event in events[:cut]:
        if event["type"].endswith(".delta"):
            index = event["output_index"]
            arrived[index] = arrived.get(index, "") + event["delta"]
        elif event["type"] == "response.output_item.done":
            done[event["output_index"]] = event["item"]
    output = response["output"]
    for index, item in enumerate(output):
        if index in done:
            assert item == done[index]
        elif item["type"] == "message":
            text = "".join(part.get("text", "") for part in item.get("content", []))
            assert text == arrived.get(index, "")
        else:
            assert item["arguments"] == arrived.get(index, "")


def test_unknown_and_malformed_events_are_ignored() -> None:
    acc = ResponsesAccumulator(0.0)
    for event in [
        {"type": "response.output_text.delta", "delta": "x"},  # no output_index
        {"type": "response.output_text.delta", "output_index": 0, "delta": 5},
        {"type": "keepalive"},
        {"type": "response.created", "response": "not an object"},
    ]:
        assert acc.add(event) is False
    assert acc.response() is None
