"""Acknowledging a written batch: XACK + XDEL, the statistics, the dead letters and the removal
of the batch's intent, all in one atomic step, so the counters can never disagree with the files.

Redis does not roll a script back when a command in it fails: the writes before the failure
stay. So every script checks first that each counter it will increment holds an integer with
room to grow (anyone can `HSET` the stats hash), and refuses the whole acknowledgement with a
`DAMAGED_STATS` error before its first write otherwise. A refused batch stays pending with its
intent, exactly as if the worker had died before acknowledging it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from vllm_middleware._crash import crash_point
from vllm_middleware.storage import BatchPlan, StreamKeys

from ._entries import DeadLetter, records_in
from ._oom import ACK_LETTERS, ack_args, ack_at_oom, counters_check, is_oom

__all__ = [
    "DAMAGED_STATS",
    "Acknowledger",
    "batch_counters",
    "dead_letter_entries",
    "is_damaged_stats",
]

DAMAGED_STATS = "DAMAGED_STATS"
# A dead letter keeps at most this much of each field: an entry of 100 MB must not be copied
# whole (twice in memory, then once more into Redis) only to be inspected by a person.
DEAD_LETTER_FIELD_BYTES = 64 * 1024

# KEYS: stream, stats, inflight. ARGV: group, intent field, comma-joined ids, (counter, amount)...
# Stream ids are digits and "-", so a comma never occurs inside one.
_ACK_BATCH = (
    counters_check("4", "#ARGV")
    + """
local ids = {}
for id in string.gmatch(ARGV[3], '[^,]+') do ids[#ids + 1] = id end
for i = 1, #ids, 1000 do
  local last = math.min(i + 999, #ids)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, last))
  redis.call('XDEL', KEYS[1], unpack(ids, i, last))
end
for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[3], ARGV[2])
return #ids
"""
)


def batch_counters(plan: BatchPlan, letters: list[DeadLetter]) -> dict[str, int]:
    """The stats hash increments for a batch (zeros left out)."""
    hincr: Counter[str] = Counter()
    # One count per partition (the plan counted them), not per record.
    for (date, host), count in plan.partitions.items():
        hincr[f"requests:date:{date}"] += count
        hincr[f"requests:host:{host}"] += count
    hincr["requests"] = plan.records
    hincr["errors"] = plan.errors
    hincr["bytes"] = plan.nbytes
    hincr["files_created"] = plan.new_files
    hincr["dead_letters"] = sum(records_in(letter.fields) for letter in letters)
    return {name: amount for name, amount in hincr.items() if amount}


def dead_letter_entries(letters: list[DeadLetter]) -> list[dict[bytes, bytes]]:
    """Dead-letter stream entries: the source entry's fields, the reason and the source id."""
    entries = []
    for entry_id, fields, reason in letters:
        dead = {}
        for name, value in fields.items():
            if len(value) > DEAD_LETTER_FIELD_BYTES:
                # A prefix to recognise the entry by, and its real size.
                dead[name] = value[:DEAD_LETTER_FIELD_BYTES]
                dead[b"cut:" + name[:64]] = str(len(value)).encode()
            else:
                dead[name] = value
        dead.update({b"reason": reason.encode(), b"source_id": entry_id})
        entries.append(dead)
    return entries


class Acknowledger:
    """One acknowledgement attempt per `send`; the caller retries (and checks the intent)."""

    def __init__(self, redis: aioredis.Redis, keys: StreamKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = redis.register_script(_ACK_BATCH)
        self._letters = redis.register_script(ACK_LETTERS)

    async def send(
        self,
        ids: list[bytes],
        counters: dict[str, int],
        letters: list[dict[bytes, bytes]],
        field: str,
    ) -> None:
        keys = self.keys
        crash_point("before-ack")
        try:
            if not letters:
                # One script call; the ids travel as one argument, not 2 x 1000.
                args: list[Any] = [keys.group, field, b",".join(ids)]
                for name, amount in counters.items():
                    args += [name, amount]
                await self._script(keys=[keys.stream, keys.stats, keys.inflight], args=args)
                crash_point("after-ack")  # applied in Redis, the worker never learns it
                return
            # Dead letters are rare: the general script (a MULTI/EXEC would go on past an error).
            every_key = [keys.stream, keys.stats, keys.inflight, keys.dead_letter]
            args = ack_args(keys.group, field, ids, counters, letters)
            await self._letters(keys=every_key, args=args)
            crash_point("after-ack")
        except ResponseError as exc:
            if not is_oom(exc):
                raise
            # The same writes as one allow-oom script: acknowledging frees the memory.
            key_set = (keys.stream, keys.stats, keys.inflight, keys.dead_letter)
            await ack_at_oom(self.redis, key_set, keys.group, field, ids, counters, letters)


def is_damaged_stats(exc: BaseException) -> bool:
    """The acknowledgement was refused, before any write, because of a damaged counter."""
    return isinstance(exc, ResponseError) and DAMAGED_STATS in str(exc)
