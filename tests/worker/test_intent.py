"""The pure intent checks (`_intent.py`): what a recovering worker may cut, property-tested."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st
from vllm_middleware._partition import sanitize_partition_value
from vllm_middleware_worker._intent import Intent, encode_intent, parse_intent, plan_cuts

MAX = 1 << 20
owners = st.text(min_size=1, max_size=30)
ids = st.tuples(st.integers(0, 2**48), st.integers(0, 99)).map(lambda t: f"{t[0]}-{t[1]}")


def own_path(owner: str, host: str, seq: int) -> str:
    name = f"{sanitize_partition_value(owner)}-{seq:06d}.jsonl"
    return f"date=2026-01-02/host={sanitize_partition_value(host)}/{name}"


@given(owners, st.lists(st.tuples(st.text(min_size=1, max_size=20), st.integers(1, 999),
       st.integers(0, MAX), st.integers(1, 1000)), min_size=1, max_size=5), ids, ids)  # fmt: skip
def test_a_consumers_own_intent_is_accepted_as_written(
    owner: str, parts: list[tuple[str, int, int, int]], first: str, last: str
) -> None:
    written = [(own_path(owner, host, seq), offset, length) for host, seq, offset, length in parts]
    raw = encode_intent([first.encode(), last.encode()], written)
    assert parse_intent(raw, owner, MAX + 5000) == Intent((first, last), tuple(written))


@given(owners, st.text(max_size=80), st.integers(-5, MAX), st.integers(-5, 1000), ids)
def test_an_accepted_path_is_always_one_of_the_owners_files(
    owner: str, path: str, offset: int, length: int, entry: str
) -> None:
    raw = orjson.dumps({"v": 2, "ids": [entry, entry], "parts": [[path, offset, length]]})
    intent = parse_intent(raw, owner, MAX)
    if isinstance(intent, Intent):
        date_dir, host_dir, name = path.split("/")
        assert date_dir.startswith("date=") and host_dir.startswith("host=")
        assert ".." not in path and not path.startswith("/")
        assert name.startswith(sanitize_partition_value(owner) + "-")
        assert offset >= 0 and 0 < length <= MAX


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_another_consumers_file_is_refused(owner: str, other: str) -> None:
    if sanitize_partition_value(owner) == sanitize_partition_value(other):
        return
    raw = encode_intent([b"1-0", b"1-0"], [(own_path(other, "h", 1), 0, 10)])
    assert isinstance(parse_intent(raw, owner, MAX), str)


def test_malformed_intents_are_refused() -> None:
    path = own_path("w", "h", 1)
    for raw in (
        b"not json",
        b"[]",
        orjson.dumps({"parts": [[path, 0]]}),  # written by an older worker: no ids, no lengths
        orjson.dumps({"v": 2, "ids": ["1-0"], "parts": [[path, 0, 1]]}),
        orjson.dumps({"v": 2, "ids": ["1-0", "x"], "parts": [[path, 0, 1]]}),
        orjson.dumps({"v": 2, "ids": ["1-0", "1-0"], "parts": [[path, 0, 1.5]]}),
        orjson.dumps({"v": 2, "ids": ["1-0", "1-0"], "parts": [[path, True, 1]]}),
        orjson.dumps({"v": 2, "ids": ["1-0", "1-0"], "parts": [["../" + path, 0, 1]]}),
        orjson.dumps({"v": 2, "ids": ["1-0", "1-0"], "parts": [[path, 0, MAX + 1]]}),
    ):
        assert isinstance(parse_intent(raw, "w", MAX), str), raw


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 1000)), min_size=1, max_size=4),
       st.integers(0, 5000))  # fmt: skip
def test_a_cut_never_reaches_below_the_intents_nor_past_a_later_batch(
    parts: list[tuple[int, int]], size: int
) -> None:
    intents = [Intent(("1-0", "1-0"), (("f", offset, length),)) for offset, length in parts]
    cuts = plan_cuts(intents, {"f": size})
    end = max(offset + length for offset, length in parts)
    low = min(offset for offset, _ in parts)
    if size > end:
        assert isinstance(cuts, str)  # bytes past every batch: not this consumer's to cut
    elif size <= low:
        assert cuts == []
    else:
        assert cuts == [("f", low)] and size - low <= end - low
