"""Shipping records to the Redis stream the workers consume, with a local spool for outages.

A batch goes out as one atomic script call: the XADDs (one per bundle of records, `_keys.py`)
plus a short-lived marker key named after the batch. The call is all-or-nothing, so when a flush
fails ambiguously (the connection broke after the call was sent) the retry asks whether the
marker exists: if it does, the batch is already in the stream and is not sent again. That is
what keeps producer retries from duplicating records.

When a flush fails (Redis unreachable, hung past `redis_timeout`, out of memory, restarting),
the batch is written to the spool (`_spool.py`) under its batch id, and the sink stops trying
Redis for live batches: they go straight to the spool, so the buffer drains at disk speed and
memory stays flat. A background probe PINGs Redis with backoff; once it answers, live batches
go to Redis again and, between them, the spool is replayed oldest first, one batch per live
batch (interleaved: the stream is not ordered across processes or workers anyway). A replayed
batch first checks its marker, so a batch whose original flush did land is not sent twice.
Markers live `_MARKER_TTL_S`; a spool older than that replays without that check.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from .._exit import run_blocking
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
from .._partition import sanitize_partition_value
from .._record import RecordEntry
from ._shipping import Shipper, ShippingSettings
from ._spool import Spool, SpoolGroup

__all__ = ["RedisStreamSink", "RedisUnavailable", "default_spool_root"]

logger = logging.getLogger("vllm_middleware")

_MARKER_TTL_S = 24 * 3600
_ADOPT_INTERVAL_S = 10.0
_SPOOL_BATCHES = 8  # batches per spool write while Redis is away
# Records per spooled batch id (one replay transaction). Packing costs ~0.5 µs a record on
# the event loop, so 500 hold it ~0.3 ms; fewer, smaller groups made the replay crawl under
# load, each group costing two hops to the spool's thread (GIL waits behind a busy loop).
_REPLAY_CHUNK = 500
_MB = 1024 * 1024
_T = TypeVar("_T")


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
    args: list[Any] = [_MARKER_TTL_S, dropped, damaged, sampled_out, len(groups)]
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
        packed = [_little(a) for a in arrays]
        return [len(self.bundles), *packed, b"".join(self.bundles)]


def _little(values: array.array[int]) -> bytes:
    if sys.byteorder != "little":
        values = array.array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


class RedisUnavailable(ConnectionError):
    """Raised instead of trying a Redis that just failed; the batch goes to the spool."""


def _private_copy(client: aioredis.Redis) -> aioredis.Redis:
    pool = client.connection_pool
    copy = aioredis.ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs)
    return aioredis.Redis.from_pool(copy)


def default_spool_root() -> Path:
    return Path.home() / ".cache" / "vllm-middleware" / "spool"


class RedisStreamSink(Shipper):
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        keys: StreamKeys,
        owns_client: bool = False,
        shipping: ShippingSettings | None = None,
    ) -> None:
        super().__init__(shipping)
        if not owns_client:
            # Batches go out from the shipping loop: an injected client (and its pool) belongs
            # to the app's loop, so the sink talks through a private one with its settings.
            redis, owns_client = _private_copy(redis), True
        self.redis = redis
        self.keys = keys
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
        self._sending_owed = False  # (`settle` may report while the flush loop does)
        self.timeout = self.settings.redis_timeout
        self.healthy = True
        self.spool: Spool | None = None
        self._io = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-mw-spool")
            if self.settings.spool
            else None
        )
        self._spool_retry_at = 0.0
        self._next_adopt = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._probe_backoff = self.retry_backoff[0]
        self._spool_errors = 0
        self._outages = 0
        self._replay_retry_at = 0.0
        self._reported_damage = 0  # damaged spool regions already counted in Redis
        # EVALSHA, reloaded by redis-py after a Redis restart empties the script cache.
        self._ship_script = redis.register_script(_SHIP_BATCH)

    # -- live batches -----------------------------------------------------------------------
    def _new_batch_id(self) -> str:
        return f"{self._token}-{next(self._batch_seq)}"

    async def ship(self, batch: list[RecordEntry], *, dropped: int, sampled_out: int) -> None:
        if not self.healthy and self._io is not None:
            raise RedisUnavailable("Redis did not answer; spooling until it does")
        if self._batch_id is None:
            self._batch_id = self._new_batch_id()
            self._attempted = False
            self._attempt_counts = (0, 0)
        await asyncio.wait_for(self._send_live(batch, dropped, sampled_out), self.timeout)
        self._batch_id = None
        self._probe_backoff = self.retry_backoff[0]
        if self._owed != (0, 0) or self._owed_attempt is not None:
            await self.report_counts(0, 0)

    async def _send_live(self, batch: list[RecordEntry], dropped: int, sampled: int) -> None:
        assert self._batch_id is not None
        marker = self.keys.batch_marker(self._batch_id)
        if self._attempted and await self.redis.exists(marker):
            # The earlier attempt landed, its counts included: what came since goes on
            # with a batch of no records.
            was_dropped, was_sampled = self._attempt_counts
            self._owe(max(0, dropped - was_dropped), max(0, sampled - was_sampled))
            return
        self._attempted = True
        self._attempt_counts = (dropped, sampled)
        await self._transaction(batch, marker, dropped, sampled_out=sampled)

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
    def _owe(self, dropped: int, sampled: int) -> None:
        owed_dropped, owed_sampled = self._owed
        self._owed = (owed_dropped + dropped, owed_sampled + sampled)

    async def report_counts(self, dropped: int, sampled_out: int) -> None:
        self._owe(dropped, sampled_out)
        if self._sending_owed or not self.healthy:
            return  # sent by the call under way, or once Redis answers again
        if self._owed == (0, 0) and self._owed_attempt is None:
            return
        self._sending_owed = True
        try:
            await asyncio.wait_for(self._send_owed(), self.timeout)
        except Exception as exc:  # owed still: the next idle flush tries again
            self.counters.last_error = f"counts: {type(exc).__name__}: {exc}"
        finally:
            self._sending_owed = False

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
        batch_id = self._new_batch_id()
        self._owed_attempt = (batch_id, dropped, sampled)
        await self._transaction([], self.keys.batch_marker(batch_id), dropped, sampled_out=sampled)
        self._owed_attempt = None
        owed_dropped, owed_sampled = self._owed
        self._owed = (owed_dropped - dropped, owed_sampled - sampled)

    async def on_ship_failed(self, batch: list[RecordEntry], exc: Exception) -> bool:
        if self._io is None:
            return False  # no spool: the batch stays in memory and is retried
        self._mark_unhealthy()
        batch_id = self._batch_id or self._new_batch_id()
        if not await self._spool_batch(batch_id, batch):
            self._batch_id = batch_id
            return False
        self._batch_id = None
        return True

    # -- spool ------------------------------------------------------------------------------
    def spool_directory(self) -> Path:
        """`<root>/<stream>-<hash of the Redis address>`: never replay into another Redis."""
        root = Path(self.settings.spool_dir) if self.settings.spool_dir else default_spool_root()
        kwargs = self.redis.connection_pool.connection_kwargs
        address = "|".join(str(kwargs.get(k)) for k in ("host", "port", "db", "path"))
        digest = hashlib.sha256(address.encode()).hexdigest()[:10]
        return root / f"{sanitize_partition_value(self.keys.stream)}-{digest}"

    async def _run_io(self, func: Callable[..., _T], *args: Any) -> _T:
        return await run_blocking(self._io, func, *args)

    async def _open_spool(self) -> Spool | None:
        if self.spool is not None or self._io is None:
            return self.spool
        if time.monotonic() < self._spool_retry_at:
            return None
        directory = self.spool_directory()
        max_bytes = int(self.settings.spool_max_mb * _MB)
        fsync = self.settings.spool_fsync
        try:
            self.spool = await self._run_io(
                lambda: Spool(directory, max_bytes=max_bytes, fsync=fsync)
            )
        except OSError as exc:
            self._spool_retry_at = time.monotonic() + 10
            self._spool_failed(f"cannot open the log spool {directory}", exc)
        return self.spool

    async def _spool_batch(self, batch_id: str, batch: list[RecordEntry]) -> bool:
        """True when the batch is durable in the spool or dropped and counted (spool full)."""
        spool = await self._open_spool()
        if spool is None:
            return False
        # A batch whose live flush was attempted stays whole under its id (its marker may
        # exist). Anything else is cut into small batches: each replays as one transaction
        # whose packing runs on the event loop, so small ones keep the request path smooth.
        attempted = self._attempted and batch_id == self._batch_id
        size = len(batch) if attempted else min(self.batch_size, _REPLAY_CHUNK)
        chunks = [(batch_id, batch[:size])]
        chunks += [
            (self._new_batch_id(), batch[i : i + size]) for i in range(size, len(batch), size)
        ]
        try:
            written = await self._run_io(spool.append_many, chunks)
        except OSError as exc:
            self._spool_failed("cannot write the log spool (records kept in memory)", exc)
            return False
        except Exception as exc:  # a record that cannot be framed (a 64 KiB host name)
            self._spool_failed("cannot frame records for the log spool", exc)
            self.count_dropped(len(batch), "records not spoolable")
            return True
        if written:
            self.counters.spooled += len(batch)
        else:
            self.count_dropped(len(batch), f"log spool full ({self.settings.spool_max_mb:g} MB)")
        self.counters.spool_bytes = spool.nbytes
        return True

    def _spool_failed(self, what: str, exc: BaseException) -> None:
        self._spool_errors += 1
        self.counters.last_error = f"{what}: {exc}"
        if self._spool_errors == 1 or self._spool_errors % 100 == 0:
            logger.warning("%s: %s", what, exc)

    def take_limit(self) -> int:
        # While Redis is away, batches go to the spool: take more at once, so one write and
        # one fsync carry many batches and the buffer drains faster than apps fill it.
        if not self.healthy and self._io is not None:
            return self.batch_size * _SPOOL_BATCHES
        return self.batch_size

    def sleeps_when_empty(self) -> bool:
        # The timer also adopts and replays spools other processes left behind.
        return False

    def has_backlog(self) -> bool:
        if not self.healthy or self.spool is None or time.monotonic() < self._replay_retry_at:
            return False
        return bool(self.spool)

    async def work_backlog(self) -> None:
        try:
            await self._replay_one()
        except Exception as exc:  # the replay must never stop the flush task
            self._spool_failed("log spool replay failed", exc)
            # An unreadable spool: pause the replay instead of spinning on it.
            self._replay_retry_at = time.monotonic() + self.retry_backoff[1]

    async def _replay_one(self) -> None:
        if self._io is None or not self.healthy:
            return
        if self.spool is None or time.monotonic() >= self._next_adopt:
            self._next_adopt = time.monotonic() + _ADOPT_INTERVAL_S
            spool = await self._open_spool()
            if spool is None:
                return
            adopted = await self._run_io(spool.adopt_orphans)
            if adopted:
                logger.warning("adopted %d log spool segments left by other processes", adopted)
        spool = self.spool
        if spool is None or not spool:
            return
        group = await self._run_io(spool.next_group)
        self.counters.spool_damaged = spool.damaged_regions
        if group is None:
            return
        try:
            await asyncio.wait_for(self._send_replay(group), self.timeout)
        except Exception as exc:
            self.counters.last_error = f"replay: {type(exc).__name__}: {exc}"
            self._mark_unhealthy()
            return
        await self._run_io(spool.commit, group)
        self.counters.replayed += len(group.entries)
        self.counters.spool_bytes = spool.nbytes
        self._probe_backoff = self.retry_backoff[0]

    async def _send_replay(self, group: SpoolGroup) -> None:
        whole = self.keys.batch_marker(group.batch_id)
        markers = [whole]
        if not group.complete:
            # Part of a batch (damage cut it): its own marker, but skip it if the whole batch
            # was delivered by the original flush.
            markers.append(self.keys.batch_marker(f"{group.batch_id}.{group.first_index}"))
        if await self.redis.exists(*markers):
            return
        damaged = self.counters.spool_damaged - self._reported_damage
        await self._transaction(group.entries, markers[-1], 0, damaged=damaged)
        self._reported_damage += damaged

    # -- health -----------------------------------------------------------------------------
    def _mark_unhealthy(self) -> None:
        if self.healthy:
            self._outages += 1
            if self._outages == 1 or self._outages % 100 == 0:
                logger.warning(
                    "Redis did not take a log batch (%s): spooling to %s until it answers",
                    self.counters.last_error,
                    self.spool_directory(),
                )
        self.healthy = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_loop(), name="vllm-mw-redis-probe"
            )

    async def _probe_loop(self) -> None:
        """PING with backoff until Redis answers; live flushes stay on the spool meanwhile."""
        while not self.healthy and not self._closed:
            await asyncio.sleep(self._probe_backoff)
            self._probe_backoff = min(self._probe_backoff * 2, self.retry_backoff[1])
            try:
                await asyncio.wait_for(self.redis.ping(), self.timeout)
            except Exception:  # still down: keep probing
                continue
            self.healthy = True
            if self._wakeup is not None:
                self._wakeup.set()

    # -- shutdown ---------------------------------------------------------------------------
    async def before_close(self, timeout: float) -> float:
        """With a spool to replay, first ask Redis once more whether it is back (the probe may
        be sleeping a long backoff), so close can replay it in its budget."""
        if not self.healthy and self.spool is not None and self.spool:
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.ping(), min(self.timeout, timeout / 4))
                self.healthy = True
            timeout = max(0.0, timeout - (time.monotonic() - started))
        return timeout

    async def rescue(self, inflight: list[RecordEntry], pending: list[RecordEntry]) -> int:
        """Spool what close() could not ship in time. The in-flight batch keeps its id (its
        flush may have landed: the marker then skips exactly it); the rest get new ids."""
        if self._io is None:
            return 0
        saved = 0
        if inflight:
            if not await self._spool_batch(self._batch_id or self._new_batch_id(), inflight):
                return 0
            self._batch_id = None
            saved += len(inflight)
        if pending and await self._spool_batch(self._new_batch_id(), pending):
            saved += len(pending)
        return saved

    async def close_sink(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._io is not None:
            if self.spool is not None:
                spool, self.spool = self.spool, None
                with contextlib.suppress(OSError):
                    await self._run_io(spool.close)
            self._io.shutdown(wait=False)
        if self._owns_client:
            await self.redis.aclose()
