"""Shipping records to the Redis stream the workers consume.

A batch goes out as one atomic script call: the XADDs (one per bundle of records, `_keys.py`)
plus a short-lived marker key named after the batch, plus the drop and sampled-out counts for
the stats hash. The call is all-or-nothing, so when a flush fails ambiguously (the connection
broke after the call was sent) the retry asks whether the marker exists: if it does, the batch
(and the counts it carried) is already in Redis and is not sent again. That is what keeps
producer retries from duplicating records or counts.

What Redis does not take is the shipper's to retry, or the spool's to keep (`SpoolingSink`,
which wraps this sink and replays through `send`, under the same batch markers).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from .._keys import (
    BUNDLE_BYTES,
    BUNDLE_RECORDS,
    FIELD_COUNT,
    FIELD_DATE,
    FIELD_ERROR,
    FIELD_HOST,
    FIELD_RECORD,
    FIELD_SUM,
    StreamKeys,
    bundle_sum,
)
from .._record import RecordEntry
from ._shipping_settings import NO_COUNTS, Unreported

__all__ = ["MARKER_TTL_S", "BatchAttempt", "RedisStreamSink", "pack_batch"]

logger = logging.getLogger("vllm_middleware")

#: how long a batch's marker says "this batch landed"; a spool older replays unchecked
MARKER_TTL_S = 24 * 3600
_MB = 1024 * 1024


# One batch as one script call instead of a MULTI/EXEC of XADDs: redis-py packs and parses every
# pipelined command in Python (~10 µs per record); here the client sends a handful of arguments
# per batch and Redis runs the XADD loop.
# Atomic like the transaction it replaces: a script runs alone, and at `maxmemory` Redis refuses
# its first write (a script that has not written yet), so an OOM batch writes nothing.
# Each XADD is a bundle (`_keys.py`): records of one (date, host), joined by newlines.
# KEYS: stream, marker, stats.
# ARGV: marker ttl, dropped, damaged, sampled out, k, k x (date, host), then chunks of bundles:
#       (bundle count, '<I2' partition index, '<I4' records, '<I4' errors, '<I4' checksum,
#       '<I4' byte length - one of each per bundle - and the bundles concatenated)...
# A counter that anyone made a non-integer (`HSET ... dropped abc`) is left alone rather than
# fail the script after its XADDs (scripts are not rolled back); `get_statistics` reports it.
_SHIP_BATCH = f"""
local stream = KEYS[1]
local function count(field, n)
  if n == '0' then return end
  local v = redis.call('HGET', KEYS[3], field)
  if v and not (string.len(v) <= 18 and (v == '0' or string.match(v, '^%-?[1-9]%d*$'))) then
    return
  end
  redis.call('HINCRBY', KEYS[3], field, n)
end
local a = 6 + 2 * tonumber(ARGV[5])
local r = 0
while a <= #ARGV do
  local count, parts, ns, errs, sums, lens, blob = tonumber(ARGV[a]), ARGV[a + 1],
    ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local pos = 1
  for j = 0, count - 1 do
    local len = struct.unpack('<I4', lens, 4 * j + 1)
    local g = 4 + 2 * struct.unpack('<I2', parts, 2 * j + 1)
    local n = struct.unpack('<I4', ns, 4 * j + 1)
    redis.call('XADD', stream, '*', '{FIELD_DATE.decode()}', ARGV[g + 2],
      '{FIELD_HOST.decode()}', ARGV[g + 3],
      '{FIELD_ERROR.decode()}', struct.unpack('<I4', errs, 4 * j + 1),
      '{FIELD_COUNT.decode()}', n, '{FIELD_SUM.decode()}', struct.unpack('<I4', sums, 4 * j + 1),
      '{FIELD_RECORD.decode()}', string.sub(blob, pos, pos + len - 1))
    pos = pos + len
    r = r + n
  end
  a = a + 7
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
count('dropped', ARGV[2])
count('spool_damaged', ARGV[3])
count('sampled_out', ARGV[4])
return r
"""
_CHUNK_BYTES = 8 * _MB  # bundles per blob argument: far below Redis's 512 MB bulk limit


def pack_batch(
    batch: Sequence[RecordEntry],
    dropped: int,
    damaged: int,
    *,
    sampled_out: int = 0,
    bundle_records: int = BUNDLE_RECORDS,
) -> list[Any]:
    """The `_SHIP_BATCH` arguments for `batch` (a few bytes objects, whatever its length)."""
    groups: dict[tuple[str, str], list[RecordEntry]] = {}
    for entry in batch:
        key = (entry.date, entry.host)
        group = groups.get(key)
        if group is None:
            if len(groups) > 0xFFFF:
                raise ValueError("more than 65536 partitions in one batch")
            group = groups[key] = []
        group.append(entry)
    args: list[Any] = [MARKER_TTL_S, dropped, damaged, sampled_out, len(groups)]
    chunk = _Chunk()
    chunks = [chunk]
    for index, ((date, host), entries) in enumerate(groups.items()):
        args += [date, host]
        start, total = 0, len(entries)
        while start < total:
            end, nbytes, errs = start, 0, 0
            while end < total and end - start < bundle_records:
                entry = entries[end]
                nbytes += len(entry.data) + 1
                if end > start and nbytes > BUNDLE_BYTES:
                    break
                errs += entry.is_error
                end += 1
            bundle = b"\n".join([entry.data for entry in entries[start:end]])
            if chunk.size and chunk.size + len(bundle) > _CHUNK_BYTES:
                chunk = _Chunk()
                chunks.append(chunk)
            chunk.add(index, end - start, errs, bundle)
            start = end
    for chunk in chunks:
        if chunk.bundles:
            args += chunk.args()
    return args


class _Chunk:
    """The bundles of one blob argument, with one partition index, record count, error count,
    checksum and byte length each (packed as `_SHIP_BATCH` reads them)."""

    __slots__ = ("bundles", "counts", "errors", "lens", "parts", "size", "sums")

    def __init__(self) -> None:
        self.parts = array.array("H")
        self.counts = array.array("I")
        self.errors = array.array("I")
        self.sums = array.array("I")
        self.lens = array.array("I")
        self.bundles: list[bytes] = []
        self.size = 0

    def add(self, part: int, count: int, errors: int, bundle: bytes) -> None:
        self.parts.append(part)
        self.counts.append(count)
        self.errors.append(errors)
        self.sums.append(bundle_sum(bundle))
        self.lens.append(len(bundle))
        self.bundles.append(bundle)
        self.size += len(bundle)

    def args(self) -> list[Any]:
        arrays = (self.parts, self.counts, self.errors, self.sums, self.lens)
        packed = [_little_endian_bytes(a) for a in arrays]
        return [len(self.bundles), *packed, b"".join(self.bundles)]


def _little_endian_bytes(values: array.array[int]) -> bytes:
    """The array's items as the script reads them (`struct.unpack('<I4', ...)`), whatever
    this machine's byte order."""
    if sys.byteorder != "little":
        values = array.array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _private_copy(client: aioredis.Redis) -> aioredis.Redis:
    pool = client.connection_pool
    copy = aioredis.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs)
    return aioredis.Redis.from_pool(copy)


class BatchAttempt(NamedTuple):
    """The batch the sink is shipping (kept across retries) and whether a flush of it was
    sent: then it may have landed, with the counts it `carried`; only its marker can tell."""

    batch_id: str
    attempted: bool
    carried: Unreported


class RedisStreamSink:
    """Ships each batch as one atomic script call; the counts with it, or owed until the
    next call carries them."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        keys: StreamKeys,
        owns_client: bool = False,
        timeout: float = 2.0,
    ) -> None:
        if not owns_client:
            # Batches go out from the shipping loop: an injected client (and its pool) belongs
            # to the app's loop, so the sink talks through a private one with its settings.
            redis, owns_client = _private_copy(redis), True
        self.redis = redis
        self.keys = keys
        self.timeout = timeout  # seconds one call may take (`redis_timeout`)
        self._owns_client = owns_client
        self._token = os.urandom(6).hex()
        self._batch_seq = itertools.count(1)
        self._batch_id: str | None = None  # id of the in-flight batch, kept across retries
        self._attempted = False
        self._attempt_counts = (0, 0)  # (dropped, sampled out) the attempted flush carried
        # Counts reported with no batch to carry them, not yet in Redis, and the id and
        # counts of the last attempt to send them (it may have landed: its marker says).
        self._owed = (0, 0)
        self._owed_attempt: tuple[str, int, int] | None = None
        # One counts-only send at a time (`settle` may report while the flush loop does).
        self._owed_lock = asyncio.Lock()
        # EVALSHA, reloaded by redis-py after a Redis restart empties the script cache.
        self._ship_script = redis.register_script(_SHIP_BATCH)

    @property
    def healthy(self) -> bool | None:
        # Without a spool nothing stops trying Redis: every batch is tried (and retried).
        # The spool (`SpoolingSink`) tracks it, and stops trying a Redis that failed.
        return True

    @property
    def address(self) -> str:
        """Where this sink's Redis is (host, port, db, socket path), as text."""
        kwargs = self.redis.connection_pool.connection_kwargs
        return "|".join(str(kwargs.get(k)) for k in ("host", "port", "db", "path"))

    async def ping(self, timeout: float | None = None) -> None:
        """Raises unless Redis answers within `timeout` (default: the sink's)."""
        await asyncio.wait_for(self.redis.ping(), self.timeout if timeout is None else timeout)

    # -- live batches -----------------------------------------------------------------------
    def new_batch_id(self) -> str:
        return f"{self._token}-{next(self._batch_seq)}"

    def current_batch(self) -> BatchAttempt:
        """The in-flight batch's id (one is assigned if there is none)."""
        if self._batch_id is None:
            self._batch_id = self.new_batch_id()
            self._attempted = False
            self._attempt_counts = (0, 0)
        return BatchAttempt(self._batch_id, self._attempted, Unreported(*self._attempt_counts))

    def forget_batch(self) -> None:
        """The in-flight batch left this sink's hands (spooled under its id): the next batch
        is a new one."""
        self._batch_id = None

    async def ship(self, batch: list[RecordEntry], *, dropped: int, sampled_out: int) -> None:
        self.current_batch()
        await asyncio.wait_for(self._send_live(batch, dropped, sampled_out), self.timeout)
        self._batch_id = None
        if self._owed != (0, 0) or self._owed_attempt is not None:
            with contextlib.suppress(Exception):  # owed still: the next idle flush tries again
                await self.report_counts(0, 0)

    async def _send_live(self, batch: list[RecordEntry], dropped: int, sampled: int) -> None:
        assert self._batch_id is not None
        marker = self.keys.batch_marker(self._batch_id)
        if self._attempted and await self.redis.exists(marker):
            # The earlier attempt landed, its counts included: what came since goes on
            # with a batch of no records.
            was_dropped, was_sampled = self._attempt_counts
            self.owe(max(0, dropped - was_dropped), max(0, sampled - was_sampled))
            return
        self._attempted = True
        self._attempt_counts = (dropped, sampled)
        await self._transaction(batch, marker, dropped, sampled_out=sampled)

    async def send(
        self,
        batch: Sequence[RecordEntry],
        batch_id: str,
        *,
        damaged: int = 0,
        counts: Unreported = NO_COUNTS,
    ) -> None:
        """Send `batch` under `batch_id`'s marker with `damaged` (spool regions lost) and
        `counts`: the spool's replay. Raises on failure; the caller bounds its time."""
        marker = self.keys.batch_marker(batch_id)
        await self._transaction(
            batch, marker, counts.dropped, damaged=damaged, sampled_out=counts.sampled_out
        )

    async def delivered(self, *batch_ids: str) -> bool:
        """True when one of these batches is known to have landed (its marker exists)."""
        markers = [self.keys.batch_marker(batch_id) for batch_id in batch_ids]
        return bool(await self.redis.exists(*markers))

    async def _transaction(
        self,
        batch: Sequence[RecordEntry],
        marker: str,
        dropped: int,
        *,
        damaged: int = 0,
        sampled_out: int = 0,
    ) -> None:
        """XADD the batch, SET its marker and count drops/damage: one atomic script call."""
        stats = self.keys.stats
        args = pack_batch(batch, dropped, damaged, sampled_out=sampled_out)
        await self._ship_script(keys=[self.keys.stream, marker, stats], args=args)

    # -- counts with no batch to carry them ---------------------------------------------------
    def owe(self, dropped: int, sampled_out: int) -> None:
        """Counts to send later (with `report_counts`, or after the next batch)."""
        owed_dropped, owed_sampled = self._owed
        self._owed = (owed_dropped + dropped, owed_sampled + sampled_out)

    async def report_counts(self, dropped: int, sampled_out: int) -> None:
        self.owe(dropped, sampled_out)
        # A caller that finds a send under way waits for it, then sends what is still owed:
        # `settle` must not return before the counts it saw are in Redis.
        async with self._owed_lock:
            if self._owed == (0, 0) and self._owed_attempt is None:
                return
            await asyncio.wait_for(self._send_owed(), self.timeout)

    async def _send_owed(self) -> None:
        """Send the owed counts as a batch of no records, with its own marker: an attempt
        that failed after landing is found by its marker and never counted twice."""
        if self._owed_attempt is not None:
            batch_id, dropped, sampled = self._owed_attempt
            if await self.redis.exists(self.keys.batch_marker(batch_id)):
                owed_dropped, owed_sampled = self._owed
                self._owed = (owed_dropped - dropped, owed_sampled - sampled)
            self._owed_attempt = None
        dropped, sampled = self._owed
        if not dropped and not sampled:
            return
        batch_id = self.new_batch_id()
        self._owed_attempt = (batch_id, dropped, sampled)
        await self._transaction([], self.keys.batch_marker(batch_id), dropped, sampled_out=sampled)
        self._owed_attempt = None
        owed_dropped, owed_sampled = self._owed
        self._owed = (owed_dropped - dropped, owed_sampled - sampled)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
