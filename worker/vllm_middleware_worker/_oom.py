"""The worker's Redis writes when Redis is at `maxmemory` (policy `noeviction`).

At OOM Redis refuses every write command, including the worker's own bookkeeping (intent HSET,
heartbeat SET, and the XACK/XDEL that would free memory). If the stream itself filled Redis
(workers down for a while), that is a deadlock: the entries that fill memory can only be removed
by a worker that cannot record its intent. Redis 7 scripts declared `allow-oom` may write at OOM,
so on an OOM error the worker repeats the same writes as such a script (atomic, like the
MULTI/EXEC it replaces). Everything it does at OOM frees far more than it takes: an ack deletes
whole entries. On Redis < 7 the script fails too and the worker keeps retrying, as before.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

__all__ = [
    "ACK_LETTERS",
    "ack_args",
    "ack_at_oom",
    "counters_check",
    "group_create_at_oom",
    "hset_at_oom",
    "is_oom",
    "set_px_at_oom",
]

_HSET = "#!lua flags=allow-oom\nreturn redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])"
_SET_PX = "#!lua flags=allow-oom\nreturn redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])"
_GROUP = """#!lua flags=allow-oom
local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if ok or string.find(tostring(err), 'BUSYGROUP') then return 1 end
return redis.error_reply(tostring(err))
"""
# Before any write: each counter (KEYS[2], ARGV pairs of name and amount from `first` to
# `last`) must hold what HINCRBY takes (a canonical integer) with at most 18 digits, so that it
# can neither fail nor overflow; otherwise the whole acknowledgement is refused, naming the
# damaged fields (`_ack.DAMAGED_STATS`).
_COUNTERS_CHECK = """
local bad = {}
for c = FIRST, LAST, 2 do
  local v = redis.call('HGET', KEYS[2], ARGV[c])
  if v and not (string.len(v) <= 18 and
      (v == '0' or string.match(v, '^%-?[1-9]%d*$'))) then
    bad[#bad + 1] = ARGV[c]
  end
end
if #bad > 0 then
  return redis.error_reply('DAMAGED_STATS counters that are not integers: ' ..
    table.concat(bad, ' '))
end
"""


def counters_check(first: str, last: str) -> str:
    """The check above for the counters in ARGV[first .. last] (Lua expressions)."""
    return _COUNTERS_CHECK.replace("FIRST", first).replace("LAST", last)


# KEYS: stream, stats, inflight, dead-letter stream.
# ARGV: group, consumer, n ids, ids..., n counters, (name, amount)...,
#       n dead letters, (n fields, field, value, ...)...
ACK_LETTERS = (
    """
local stream, stats, inflight, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local i = 3
local n = tonumber(ARGV[i]); i = i + 1
local ids = {}
for j = 1, n do ids[j] = ARGV[i]; i = i + 1 end
local m = tonumber(ARGV[i]); i = i + 1
"""
    + counters_check("i", "i + 2 * m - 1")
    + """
for j = 1, m do redis.call('HINCRBY', stats, ARGV[i], ARGV[i + 1]); i = i + 2 end
local d = tonumber(ARGV[i]); i = i + 1
for j = 1, d do
  local f = tonumber(ARGV[i]); i = i + 1
  local args = {'XADD', dead, 'MAXLEN', '~', '100000', '*'}
  for k = 1, f * 2 do args[#args + 1] = ARGV[i]; i = i + 1 end
  redis.call(unpack(args))
end
for s = 1, n, 1000 do  -- unpack has a stack limit
  local e = math.min(s + 999, n)
  redis.call('XACK', stream, ARGV[1], unpack(ids, s, e))
  redis.call('XDEL', stream, unpack(ids, s, e))
end
redis.call('HDEL', inflight, ARGV[2])
return 1
"""
)
_ACK = "#!lua flags=allow-oom\n" + ACK_LETTERS


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, ResponseError) and "maxmemory" in str(exc)
    )


async def hset_at_oom(redis: aioredis.Redis, key: str, field: str, value: bytes) -> None:
    await redis.eval(_HSET, 1, key, field, value)


async def group_create_at_oom(redis: aioredis.Redis, stream: str, group: str) -> None:
    """The consumer group, created even at OOM (a first start with the stream already full)."""
    await redis.eval(_GROUP, 1, stream, group)


async def set_px_at_oom(redis: aioredis.Redis, key: str, value: bytes, px: int) -> None:
    await redis.eval(_SET_PX, 1, key, value, px)


async def ack_at_oom(
    redis: aioredis.Redis,
    keys: tuple[str, str, str, str],
    group: str,
    consumer: str,
    ids: list[bytes],
    counters: dict[str, int],
    dead: list[dict[bytes, bytes]],
) -> None:
    """XADD the dead letters, XACK + XDEL `ids`, HINCRBY the counters, HDEL the intent."""
    await redis.eval(_ACK, 4, *keys, *ack_args(group, consumer, ids, counters, dead))


def ack_args(
    group: str,
    consumer: str,
    ids: list[bytes],
    counters: dict[str, int],
    dead: list[dict[bytes, bytes]],
) -> list[Any]:
    """The ARGV of `ACK_LETTERS`."""
    args: list[Any] = [group, consumer, len(ids), *ids, len(counters)]
    for name, amount in counters.items():
        args += [name, amount]
    args.append(len(dead))
    for fields in dead:
        args.append(len(fields))
        for field, value in fields.items():
            args += [field, value]
    return args
