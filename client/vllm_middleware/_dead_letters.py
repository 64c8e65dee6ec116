"""The dead-letter stream, for operators: list, show, replay (after a fix) and purge.

A dead letter is the original stream entry's fields plus `reason` and `source_id` (see the
worker's `_ack.py`). Replaying one puts those original fields back on the stream as a new entry
and removes the dead letter; purging removes it. Each replay or purge happens in one script call
(so a letter is never replayed twice, nor both replayed and purged) and is recorded in the
`<stream>:dead:log` stream with the dead letter's id, its source entry's id and the new id:
the record of what happened to every entry that once failed.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from ._keys import FIELD_COUNT, FIELD_DATE, FIELD_HOST, FIELD_RECORD, StreamKeys

__all__ = ["DeadLetters"]

_LOG_MAXLEN = 100_000

# KEYS: stream, dead letters, log. ARGV: dead letter id, action ("replayed"/"purged"), time,
# the log's approximate length bound.
_ACT = """
local found = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #found == 0 then return false end
local fields = found[1][2]
local keep, reason, source = {}, '', ''
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  if name == 'reason' then reason = value
  elseif name == 'source_id' then source = value
  else keep[#keep + 1] = name; keep[#keep + 1] = value end
end
local new = ''
if ARGV[2] == 'replayed' then
  if #keep == 0 then return redis.error_reply('dead letter ' .. ARGV[1] .. ' holds no fields') end
  new = redis.call('XADD', KEYS[1], '*', unpack(keep))
end
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'action', ARGV[2],
  'dead_id', ARGV[1], 'source_id', source, 'new_id', new, 'reason', reason, 'at', ARGV[3])
return new
"""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def summarize(entry_id: Any, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One line's worth of a dead letter (no record bodies)."""
    rec = fields.get(FIELD_RECORD)
    try:
        records = int(fields.get(FIELD_COUNT, b"1"))
    except ValueError:
        records = 1
    return {
        "id": _text(entry_id),
        "source_id": _text(fields.get(b"source_id", b"")),
        "reason": _text(fields.get(b"reason", b"")),
        "date": _text(fields[FIELD_DATE]) if FIELD_DATE in fields else None,
        "host": _text(fields[FIELD_HOST]) if FIELD_HOST in fields else None,
        "records": records,
        "bytes": len(rec) if isinstance(rec, bytes) else 0,
        "at": int(_text(entry_id).split("-")[0]) / 1000,
    }


class DeadLetters:
    """Operations on one pipeline's dead letters through a blocking Redis client."""

    def __init__(self, client: redis.Redis, keys: StreamKeys) -> None:
        self.client = client
        self.keys = keys
        self.log_key = f"{keys.dead_letter}:log"
        self._act = client.register_script(_ACT)

    def count(self) -> int:
        return int(self.client.xlen(self.keys.dead_letter))

    def page(self, count: int = 100, after: str = "-") -> list[dict[str, Any]]:
        start = after if after == "-" else f"({after}"
        entries = self.client.xrange(self.keys.dead_letter, start, "+", count=count)
        return [summarize(entry_id, fields) for entry_id, fields in entries]

    def show(self, entry_id: str) -> dict[str, Any] | None:
        """The letter's summary, its other fields and its records (one per line of `rec`)."""
        found = self.client.xrange(self.keys.dead_letter, entry_id, entry_id)
        if not found:
            return None
        fields = found[0][1]
        shown = summarize(found[0][0], fields)
        known = {FIELD_RECORD, FIELD_DATE, FIELD_HOST, FIELD_COUNT, b"reason", b"source_id"}
        shown["fields"] = {_text(k): _text(v) for k, v in fields.items() if k not in known}
        rec = fields.get(FIELD_RECORD, b"")
        shown["records_text"] = [_text(line) for line in rec.split(b"\n") if line]
        return shown

    def replay(self, entry_ids: list[str]) -> dict[str, str | None]:
        """Put each letter back on the stream; dead id -> new stream id (None: no such letter)."""
        return self._run("replayed", entry_ids)

    def purge(self, entry_ids: list[str]) -> dict[str, str | None]:
        """Delete each letter; dead id -> "" (None: no such letter)."""
        return self._run("purged", entry_ids)

    def all_ids(self) -> list[str]:
        ids: list[str] = []
        start = "-"
        while True:
            page = self.client.xrange(self.keys.dead_letter, start, "+", count=1000)
            ids += [_text(entry_id) for entry_id, _ in page]
            if len(page) < 1000:
                return ids
            start = f"({ids[-1]}"

    def history(self, count: int = 100) -> list[dict[str, str]]:
        """The most recent replays and purges, newest first."""
        entries = self.client.xrevrange(self.log_key, "+", "-", count=count)
        return [
            {"log_id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}}
            for entry_id, fields in entries
        ]

    def _run(self, action: str, entry_ids: list[str]) -> dict[str, str | None]:
        results: dict[str, str | None] = {}
        keys = [self.keys.stream, self.keys.dead_letter, self.log_key]
        for entry_id in entry_ids:
            reply = self._act(keys=keys, args=[entry_id, action, f"{time.time():.3f}", _LOG_MAXLEN])
            results[entry_id] = None if reply is None else _text(reply)
        return results
