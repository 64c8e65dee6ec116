"""Stream entries to lines: the checks a batch passes before it is written, and its dead letters.

An entry is a bundle (`vllm_middleware.storage`): `n` records of one (date, host) joined by
newlines. A bundle from this project's client carries the checksum its packing computed over
orjson's output: when it matches (and a few byte scans agree with `n`), the bundle reaches the
file as it is, never parsed. Anything else - an older client, another producer, a damaged
bundle - is parsed record by record: each line written is one JSON object in valid UTF-8, the
rest goes to the dead-letter stream with the reason, so one bad record never holds up its
neighbours nor the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from vllm_middleware.storage import (
    FIELD_COUNT,
    FIELD_DATE,
    FIELD_ERROR,
    FIELD_HOST,
    FIELD_RECORD,
    FIELD_SUM,
    PartitionLines,
    bundle_sum,
    host_problem,
    is_valid_date,
)

__all__ = ["DeadLetter", "Entry", "EntrySorter", "SortedBatch", "records_in"]

Entry = tuple[bytes, Any]  # (id, fields: dict, flat [field, value, ...] list, or None)


class DeadLetter(NamedTuple):
    """An entry (or the records of one) that cannot be written, and why."""

    entry_id: bytes  # the source entry's id
    fields: dict[bytes, bytes]
    reason: str


_MAX_PARTITIONS = 10_000  # (date, host) checks remembered: hosts x dates seen recently


@dataclass
class SortedBatch:
    """One batch, sorted: every id (acknowledged and deleted once the lines are durable), the
    lines to write and the dead letters."""

    ids: list[bytes] = field(default_factory=list)
    lines: PartitionLines = field(default_factory=PartitionLines)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    nbytes: int = 0  # of the records read, for sizing the next read


def as_dict(fields: Any) -> dict[bytes, bytes]:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=False))


def records_in(fields: dict[bytes, bytes]) -> int:
    """How many records an entry holds, for the counters: what it says, but never more lines
    than it has (a forged `n` of 10**30 would overflow the counter), and 1 for nonsense."""
    count = fields.get(FIELD_COUNT, b"1")
    if not (count.isdigit() and 0 < len(count) <= 12):
        return 1
    lines = fields.get(FIELD_RECORD, b"").count(b"\n") + 1
    return max(1, min(int(count), lines))


class _Partition(NamedTuple):
    date: str
    host: str


class _BundleCounts(NamedTuple):
    records: int
    errors: int


def _check_partition(raw_date: bytes, raw_host: bytes) -> _Partition | str:
    """The entry's partition, decoded and valid, or why not."""
    try:
        date = raw_date.decode("ascii")
        host = raw_host.decode("utf-8")
    except UnicodeDecodeError:
        return "missing or undecodable date/host field"
    if not is_valid_date(date):
        return f"invalid date partition {date[:40]!r}"
    problem = host_problem(host)
    if problem is not None:
        return f"invalid host partition: {problem}"
    return _Partition(date, host)


class EntrySorter:
    """Sorts raw XREADGROUP entries into a `SortedBatch`; remembers which partitions are valid."""

    def __init__(self, max_record_bytes: int) -> None:
        self.max_record_bytes = max_record_bytes
        # (date bytes, host bytes) -> (date, host), or the reason they are invalid.
        self._partitions: dict[tuple[bytes, bytes], _Partition | str] = {}

    def sort(
        self, entries: list[Entry], dead_letter_reasons: dict[bytes, str] | None = None
    ) -> SortedBatch:
        """`dead_letter_reasons` names entries to dead-letter whatever they hold, and why."""
        batch = SortedBatch()
        ids, letters = batch.ids, batch.dead_letters
        lines = batch.lines
        if len(self._partitions) > _MAX_PARTITIONS:
            self._partitions.clear()
        max_bytes = self.max_record_bytes
        nbytes = 0
        for entry_id, fields in entries:
            ids.append(entry_id)
            if fields is None:  # deleted while pending (trimmed by an operator): nothing to write
                continue
            if dead_letter_reasons and entry_id in dead_letter_reasons:
                reason = dead_letter_reasons[entry_id]
                letters.append(DeadLetter(entry_id, as_dict(fields), reason))
                continue
            # Fast path: the field order our clients write, a valid partition, the checksum
            # of our client's packing, lines that agree with the counts (`{` ... `}` around
            # every newline, as many newlines as records less one).
            if (
                type(fields) is list
                and len(fields) == 12
                and fields[0] == FIELD_DATE
                and fields[2] == FIELD_HOST
                and fields[4] == FIELD_ERROR
                and fields[6] == FIELD_COUNT
                and fields[8] == FIELD_SUM
                and fields[10] == FIELD_RECORD
            ):
                data = fields[11]
                known = self._partition(fields[1], fields[3])
                if (
                    type(known) is tuple
                    and len(data) <= max_bytes
                    and _sum_matches(data, fields[9])
                ):
                    counts = _whole_bundle(data, fields[7], fields[5])
                    if counts is not None:
                        lines.add(known[0], known[1], data, *counts)
                        nbytes += len(data)
                        continue
            fields = as_dict(fields)
            nbytes += len(fields.get(FIELD_RECORD, b""))
            self._salvage(entry_id, fields, lines, letters)
        batch.nbytes = nbytes
        return batch

    def _partition(self, raw_date: bytes, raw_host: bytes) -> tuple[str, str] | str:
        known = self._partitions.get((raw_date, raw_host))
        if known is None:
            known = self._partitions[(raw_date, raw_host)] = _check_partition(raw_date, raw_host)
        return known

    def _salvage(
        self,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        lines: PartitionLines,
        letters: list[DeadLetter],
    ) -> None:
        """An entry that missed the fast path (another field order, a new partition, a damaged
        bundle): what can be written goes to `lines`, the rest to `letters`; a damaged bundle
        is taken apart record by record."""
        data = fields.get(FIELD_RECORD)
        raw_date, raw_host = fields.get(FIELD_DATE), fields.get(FIELD_HOST)
        if data is None:
            letters.append(DeadLetter(entry_id, fields, "missing record field"))
            return
        if len(data) > self.max_record_bytes:  # not even split: it would be copied whole
            reason = f"entry of {len(data)} bytes exceeds max_record_bytes"
            letters.append(DeadLetter(entry_id, fields, reason))
            return
        if raw_date is None or raw_host is None:
            letters.append(DeadLetter(entry_id, fields, "missing or undecodable date/host field"))
            return
        partition = self._partition(raw_date, raw_host)
        if isinstance(partition, str):
            letters.append(DeadLetter(entry_id, fields, partition))
            return
        date, host = partition
        count = fields.get(FIELD_COUNT)
        raw_errors = fields.get(FIELD_ERROR, b"0")
        if count is None or count == b"1":  # one record: a newline in it may be JSON whitespace
            line, reason = self._check_record(data)
            if line is None:
                letters.append(DeadLetter(entry_id, fields, reason))
            else:
                lines.add(date, host, line, 1, int(raw_errors == b"1"))
            return
        raw_sum = fields.get(FIELD_SUM)
        counts = _whole_bundle(data, count, raw_errors)
        if counts is not None and raw_sum is not None and _sum_matches(data, raw_sum):
            lines.add(date, host, data, *counts)
            return
        for raw in data.split(b"\n"):
            line, reason = self._check_record(raw)
            if line is None:
                alone = {FIELD_DATE: raw_date, FIELD_HOST: raw_host, FIELD_RECORD: raw}
                letters.append(DeadLetter(entry_id, alone, reason))
            else:
                lines.add(date, host, line, 1, _is_error(line))

    def _check_record(self, data: bytes) -> tuple[bytes | None, str]:
        """The record as one JSON-object line, or why it cannot be written."""
        if len(data) > self.max_record_bytes:
            return None, f"record of {len(data)} bytes exceeds max_record_bytes"
        try:
            parsed = orjson.loads(data)  # also refuses invalid UTF-8
        except orjson.JSONDecodeError:
            return None, "record is not valid JSON in UTF-8"
        if not isinstance(parsed, dict):
            return None, "record is not a JSON object"
        if b"\n" in data or b"\r" in data:
            # Lines must stay whole JSON objects: a line break (JSON whitespace here) would
            # split one record in two for line readers.
            return orjson.dumps(parsed), ""
        return data, ""


def _whole_bundle(data: bytes, raw_count: bytes, raw_errors: bytes) -> _BundleCounts | None:
    """The record and error counts of a bundle of whole JSON-object lines, checked without parsing:
    `{` ... `}` around it and around every newline, as many newlines as records less one."""
    if not (raw_count.isdigit() and raw_errors.isdigit()):
        return None
    count, errs = int(raw_count), int(raw_errors)
    if not (count > 0 and errs <= count and data[:1] == b"{" and data[-1:] == b"}"):
        return None
    # A walk from newline to newline: `find` is a memchr (tens of GB/s) where `count` scans a
    # byte at a time (~1 GB/s, 2 us per KB and pass here), and records are long.
    find = data.find
    pos = find(b"\n")
    newlines = 0
    while pos >= 0:
        if data[pos - 1] != 0x7D or data[pos + 1] != 0x7B:  # "}" before, "{" after
            return None
        newlines += 1
        pos = find(b"\n", pos + 2)
    return _BundleCounts(count, errs) if newlines == count - 1 else None


def _sum_matches(data: bytes, raw_sum: bytes) -> bool:
    return raw_sum.isdigit() and len(raw_sum) <= 10 and int(raw_sum) == bundle_sum(data)


def _is_error(line: bytes) -> int:
    # The client's own rule (a record is an error when its `error` field is set); only used
    # for records taken out of a damaged bundle, whose error count cannot be split.
    try:
        return int(orjson.loads(line).get("error") is not None)
    except (orjson.JSONDecodeError, AttributeError):
        return 0
