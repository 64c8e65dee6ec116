"""The stream consumer: read a batch, write it durably, then acknowledge it with the statistics.

Per batch: XREADGROUP -> validate -> plan files -> record the plan (the "intent") in Redis ->
append + fsync -> one script call (or MULTI/EXEC with dead letters) with XACK, XDEL, the
counters and the intent's removal. If the worker dies after the write and before the ack, the
intent says which bytes of which files that batch may have written; whoever recovers the dead
worker's entries first truncates those files back (see `_recovery.py`), so the retried batch
never leaves a duplicate line.

Pipelined, to keep the disk busy: the next batch's XREADGROUP (and its validation) runs while
this batch is written, and this batch's acknowledgement runs while the next one is written. So
a consumer has at most two unacknowledged batches, each under its own intent field
(`intent_fields`); recovery undoes both. Reading our own pending entries waits for the
acknowledgement in flight, so a batch is never read twice by its own consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from vllm_middleware import PartitionWriter, RecordEntry, StreamKeys
from vllm_middleware._keys import FIELD_DATE, FIELD_ERROR, FIELD_HOST, FIELD_RECORD
from vllm_middleware._partition import BatchPlan, is_valid_date

from ._config import WorkerConfig
from ._oom import ack_at_oom, group_create_at_oom, hset_at_oom, is_oom, set_px_at_oom
from ._recovery import Recovery, intent_fields

__all__ = ["ConsumerStatus", "StreamConsumer"]

logger = logging.getLogger("vllm_middleware_worker")

# Errors that a retry can outlive: Redis unreachable or restarting, disk errors, and error
# replies (OOM at `maxmemory`, READONLY during a failover, NOGROUP after a Redis lost its
# data): the batch is kept, retried with backoff and reported, and the consumer never dies of it.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, ResponseError)
_MAX_HOST_LEN = 1024

Entry = tuple[bytes, Any]  # (id, fields: dict, flat [field, value, ...] list, or None)

# KEYS: stream, stats, inflight. ARGV: group, intent field, comma-joined ids, (counter, amount)...
# Stream ids are digits and "-", so a comma never occurs inside one.
_ACK_BATCH = """
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

_Sorted = tuple[
    list[bytes], list[RecordEntry], list[tuple[bytes, dict[bytes, bytes], str]], list[bytes]
]
# tuple.__new__ bound to RecordEntry: a NamedTuple built in C (its own `_make` is Python).
_new_entry: Callable[[tuple[str, str, bool, bytes]], RecordEntry] = partial(
    tuple.__new__, RecordEntry
)


def _identity(response: Any, **options: Any) -> Any:
    return response


def _as_dict(fields: Any) -> dict[bytes, bytes]:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=False))


def _check_partition(raw_date: bytes, raw_host: bytes) -> tuple[str, str] | str:
    """(date, host) decoded and valid, or why not (the entry then goes to the dead letters)."""
    try:
        date = raw_date.decode("ascii")
        host = raw_host.decode("utf-8")
    except UnicodeDecodeError:
        return "missing or undecodable date/host field"
    if not is_valid_date(date):
        return f"invalid date partition {date[:40]!r}"
    if not host or len(host) > _MAX_HOST_LEN or "\x00" in host:
        return "invalid host partition"
    return date, host


@dataclass
class ConsumerStatus:
    """What the worker reports about itself (logs, health, tests)."""

    batches: int = 0
    records: int = 0
    dead_letters: int = 0
    write_failures: int = 0
    redis_failures: int = 0
    recovered_consumers: int = 0
    last_error: str | None = None
    last_batch_at: float | None = None
    errors_by_kind: Counter[str] = field(default_factory=Counter)


class StreamConsumer:
    """Drains the stream into this worker's partition files. Inject the Redis client.

    The client should have `socket_timeout` above `block_ms` (a blocked XREADGROUP would
    otherwise time out) and is not closed here.
    """

    def __init__(self, redis: aioredis.Redis, config: WorkerConfig) -> None:
        self.redis = redis
        self.config = config
        self.keys = StreamKeys(config.stream)
        self.writer = PartitionWriter(
            config.log_dir,
            config.consumer,
            max_bytes=config.max_bytes,
            log_format="json" if config.log_format == "json" else "jsonl",
            fsync=config.fsync,
        )
        self.status = ConsumerStatus()
        self.recovery = Recovery(redis, config, self)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-mw-write")
        # The same connections, but XREADGROUP replies left as hiredis returns them: redis-py's
        # reply callback builds a dict per entry (~1 us/record); `_fast_fields` reads the fixed
        # field order our clients write instead, and falls back to a dict for anything else.
        self._raw = aioredis.Redis(connection_pool=redis.connection_pool)
        self._raw.set_response_callback("XREADGROUP", _identity)
        self._ack_script = redis.register_script(_ACK_BATCH)
        # (date bytes, host bytes) -> (date, host), or the reason they are invalid.
        self._partitions: dict[tuple[bytes, bytes], tuple[str, str] | str] = {}
        # The next batch's XREADGROUP, sent while this batch is written and acknowledged, so
        # Redis's read time and the reply's parsing overlap the write + fsync.
        self._prefetch: asyncio.Task[_Sorted | None] | None = None
        # The previous batch's acknowledgement, running while this batch is written. Each of
        # the (at most) two unacknowledged batches has its own intent field (`_slot`).
        self._ack_task: asyncio.Task[None] | None = None
        self._slot = 0
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        self._own_pending = True  # re-read our own pending entries after a start or an error
        self.disk_error: str | None = None  # set while writes fail, cleared by the next success

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, burst: bool = False) -> None:
        """Consume until `stop()`; with `burst`, return once the stream is drained."""
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="vllm-mw-heartbeat")
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    if self._own_pending:
                        await self._ensure_group()
                        await self._beat()
                        # A previous life of this consumer may have died mid-batch.
                        await self.recovery.undo_intent(self.config.consumer)
                    if time.monotonic() >= self._next_claim:
                        self._next_claim = time.monotonic() + self.config.claim_interval_s
                        await self.recovery.recover_dead_consumers()
                    handled = False
                    if self._own_pending:
                        handled = await self._consume(b"0")
                        self._own_pending = handled
                    if not handled:
                        handled = await self._consume(b">", block=not burst)
                    if burst and not handled:
                        await self._settle_ack()
                        if await self._drained():
                            return
                    backoff = 0.1
                except _TRANSIENT as exc:
                    self._note_error("redis", exc)
                    self.status.redis_failures += 1
                    # Our pending entries are re-read next: a batch being acknowledged must
                    # be done first (it retries until it is), or it would be read again.
                    await self._settle_ack()
                    self._own_pending = True  # re-reads whatever a prefetch had taken
                    await self._drop_prefetch()
                    # After an outage (a Redis restart expires heartbeat keys by wall clock)
                    # every peer looks dead until its next beat: give them one TTL to beat
                    # again before taking anyone's entries.
                    self._next_claim = max(
                        self._next_claim, time.monotonic() + self.config.heartbeat_ttl_s
                    )
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            # Stopping: the batch read ahead is ours (pending) - write and acknowledge it too.
            if self._prefetch is not None:
                task, self._prefetch = self._prefetch, None
                with contextlib.suppress(*_TRANSIENT):
                    if (ready := await task) is not None:
                        await self._process_sorted(ready)
        finally:
            await self._drop_prefetch()
            if self._ack_task is not None:  # the data is on disk: finish its acknowledgement
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._ack_task)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await asyncio.get_running_loop().run_in_executor(self._executor, self.writer.close)
            self._executor.shutdown(wait=True)
            with contextlib.suppress(*_TRANSIENT):
                await self.redis.delete(self.keys.heartbeat(self.config.consumer))

    def stop(self) -> None:
        """Finish the current batch, then return from `run`."""
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except ResponseError as exc:
            if is_oom(exc):
                await group_create_at_oom(self.redis, self.keys.stream, self.keys.group)
            elif "BUSYGROUP" not in str(exc):
                raise

    async def _beat(self) -> None:
        # The heartbeat carries this worker's health, so ops tools (and tests) can see a full
        # disk or a Redis that keeps failing without reading the worker's log.
        ttl_ms = int(self.config.heartbeat_ttl_s * 1000)
        health = orjson.dumps(self.health())
        key = self.keys.heartbeat(self.config.consumer)
        try:
            await self.redis.set(key, health, px=ttl_ms)
        except ResponseError as exc:
            if not is_oom(exc):
                raise
            # At maxmemory a missed beat would make every worker look dead to the others.
            await set_px_at_oom(self.redis, key, health, ttl_ms)

    async def _heartbeat_loop(self) -> None:
        # Separate from the batch loop so that a long write (slow disk) does not look like death.
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            with contextlib.suppress(*_TRANSIENT):
                await self._beat()

    async def _drained(self) -> bool:
        groups = await self.redis.xinfo_groups(self.keys.stream)
        for group in groups:
            if group["name"] in (self.keys.group, self.keys.group.encode()):
                return bool(group["pending"] == 0 and group.get("lag") in (0, None))
        return True

    # -- batches ----------------------------------------------------------------------------
    async def _read(self, start: bytes, *, block: bool = False) -> list[Entry]:
        args: list[Any] = ["XREADGROUP", "GROUP", self.keys.group, self.config.consumer]
        args += ["COUNT", self.config.batch_size]
        if block:
            args += ["BLOCK", self.config.block_ms]
        args += ["STREAMS", self.keys.stream, start]
        response = await self._raw.execute_command(*args)
        if not response:
            return []
        if isinstance(response, dict):  # RESP3: {stream: entries}
            response = list(response.items())
        return response[0][1] or []

    async def _drop_prefetch(self) -> None:
        """Forget a read-ahead (its entries stay pending for us: `_own_pending` re-reads them)."""
        task, self._prefetch = self._prefetch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_TRANSIENT):
                await task

    async def _consume(self, start: bytes, *, block: bool = False) -> bool:
        if start == b">" and self._prefetch is not None:
            task, self._prefetch = self._prefetch, None
            ready = await task
            if ready is not None:
                await self._process_sorted(ready, read_ahead=True)
                return True
        if start == b"0":
            # Our pending entries: a batch still being acknowledged is among them until its
            # ack lands, and must not be read (and written) a second time.
            await self._settle_ack()
        entries = await self._read(start, block=block)
        if not entries:
            return False
        too_often = await self._delivered_too_often(entries) if start == b"0" else None
        await self.process(entries, undeliverable=too_often, read_ahead=start == b">")
        return True

    async def _delivered_too_often(self, entries: Sequence[Entry]) -> dict[bytes, str]:
        """Our own pending entries, re-read after a restart under the same consumer name: an
        entry that keeps killing the worker would otherwise be retried forever (claims by
        other workers are bounded in `_recovery.py`; this bounds a fixed `--consumer` name).
        """
        pending = await self.redis.xpending_range(
            self.keys.stream,
            self.keys.group,
            entries[0][0],
            entries[-1][0],
            len(entries),
            consumername=self.config.consumer,
        )
        limit = self.config.max_deliveries
        return {
            p["message_id"]: f"delivered {p['times_delivered']} times"
            for p in pending
            if p["times_delivered"] >= limit
        }

    async def process(
        self,
        entries: Sequence[Entry],
        *,
        undeliverable: dict[bytes, str] | None = None,
        read_ahead: bool = False,
    ) -> None:
        """Write a batch durably, then acknowledge it; retries until both are done.

        `entries` hold each entry's fields as a dict or as the flat [field, value, ...] list
        of a raw reply. `undeliverable` names entries to send to the dead-letter stream
        whatever they hold (e.g. delivered too often), with the reason.
        """
        await self._process_sorted(self._sort(entries, undeliverable), read_ahead=read_ahead)

    async def _process_sorted(self, batch: _Sorted, *, read_ahead: bool = False) -> None:
        """Write the batch (its own intent field), then start its acknowledgement, which runs
        while the next batch is read and written; the previous one must be done first."""
        good_ids, records, poison, gone = batch
        plan = self.writer.plan(records)
        if read_ahead and self._prefetch is None and not self._stopping.is_set():
            self._prefetch = asyncio.create_task(self._read_sorted(), name="vllm-mw-read-ahead")
        field = intent_fields(self.config.consumer)[self._slot]
        self._slot ^= 1
        await self._write_durably(plan, records, field)
        # Before this batch's ack, and before the next batch reuses the previous one's field.
        await self._settle_ack()
        ack = self._acknowledge(plan, records, good_ids, poison, gone, field)
        if poison:
            await ack  # dead letters: rare, keep them simple
        else:
            self._ack_task = asyncio.create_task(ack, name="vllm-mw-ack")

    async def _settle_ack(self) -> None:
        """Wait for the previous batch's acknowledgement (it retries until it is done)."""
        task, self._ack_task = self._ack_task, None
        if task is not None:
            await task

    def _sort(self, entries: Sequence[Entry], undeliverable: dict[bytes, str] | None) -> _Sorted:
        """Split a batch into (ids, records) to write, poison to dead-letter and deleted ids."""
        good_ids: list[bytes] = []
        records: list[RecordEntry] = []
        poison: list[tuple[bytes, dict[bytes, bytes], str]] = []
        gone: list[bytes] = []
        partitions = self._partitions
        if len(partitions) > 10_000:  # bounded: hosts x dates seen recently
            partitions.clear()
        max_bytes = self.config.max_record_bytes
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending (trimmed by an operator): nothing to write
                gone.append(entry_id)
                continue
            if undeliverable and entry_id in undeliverable:
                poison.append((entry_id, _as_dict(fields), undeliverable[entry_id]))
                continue
            if (
                type(fields) is list
                and len(fields) == 8
                and fields[0] == FIELD_DATE
                and fields[2] == FIELD_HOST
                and fields[4] == FIELD_ERROR
                and fields[6] == FIELD_RECORD
            ):
                # Fast path, inlined (~1000 times per batch): the field order our clients
                # write, a partition already validated, a record that is one JSON line.
                data = fields[7]
                known = partitions.get((fields[1], fields[3]))
                if (
                    type(known) is tuple
                    and len(data) <= max_bytes
                    and data[:1] == b"{"
                    and data[-1:] == b"}"
                    and b"\n" not in data
                ):
                    good_ids.append(entry_id)
                    records.append(_new_entry((known[0], known[1], fields[5] == b"1", data)))
                    continue
                record, reason = self._validate_parts(fields[1], fields[3], fields[5], data)
            else:
                fields = _as_dict(fields)
                record, reason = self._validate(fields)
            if record is None:
                poison.append((entry_id, _as_dict(fields), reason))
            else:
                good_ids.append(entry_id)
                records.append(record)
        return good_ids, records, poison, gone

    async def _read_sorted(self) -> _Sorted | None:
        """Read ahead: the next batch, already sorted (runs while the current one is written)."""
        entries = await self._read(b">")
        return self._sort(entries, None) if entries else None

    def _validate(self, fields: dict[bytes, bytes]) -> tuple[RecordEntry | None, str]:
        data = fields.get(FIELD_RECORD)
        if data is None:
            return None, "missing record field"
        date = fields.get(FIELD_DATE)
        host = fields.get(FIELD_HOST)
        if date is None or host is None:
            return None, "missing or undecodable date/host field"
        return self._validate_parts(date, host, fields.get(FIELD_ERROR, b"0"), data)

    def _validate_parts(
        self, raw_date: bytes, raw_host: bytes, err: bytes, data: bytes
    ) -> tuple[RecordEntry | None, str]:
        if len(data) > self.config.max_record_bytes:
            return None, f"record of {len(data)} bytes exceeds max_record_bytes"
        partition = self._partitions.get((raw_date, raw_host))
        if partition is None:
            partition = self._partitions[(raw_date, raw_host)] = _check_partition(
                raw_date, raw_host
            )
        if isinstance(partition, str):
            return None, partition
        if not data.startswith(b"{") or not data.endswith(b"}") or b"\n" in data:
            # Lines must stay whole JSON objects; a newline would split one record in two.
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                return None, "record is not valid JSON"
            if not isinstance(parsed, dict):
                return None, "record is not a JSON object"
            data = orjson.dumps(parsed)
        return _new_entry((partition[0], partition[1], err == b"1", data)), ""

    def _intent(self, plan: BatchPlan) -> bytes:
        # Paths relative to log_dir: a recovering worker may have another working directory.
        root = self.writer.log_dir
        return orjson.dumps(
            {"parts": [[str(p.path.relative_to(root)), p.offset] for p in plan.parts]}
        )

    async def _write_durably(self, plan: BatchPlan, records: list[RecordEntry], field: str) -> None:
        """Record the intent, then write and fsync; retry (re-planning) until it succeeds.

        After a failed write (disk full, read-only, permissions) the batch's bytes are cut
        back first (the writer already tries; a read-only disk can refuse), and only then is
        the batch planned and written again: a file never keeps a partial batch that a retry
        would duplicate. Until the cut succeeds the intent stays as it was, so a worker that
        dies meanwhile is cleaned up by whoever recovers it.
        """
        backoff = 0.2
        loop = asyncio.get_running_loop()
        while True:
            try:
                # Set even for an empty plan: its presence is how `_acknowledge` tells a lost
                # EXEC reply from an EXEC that never ran.
                await self._record_intent(plan, field)
                if plan.parts:
                    await loop.run_in_executor(self._executor, self.writer.write, plan)
                self.disk_error = None
                return
            except _TRANSIENT as exc:
                disk_failed = isinstance(exc, OSError)
                if disk_failed:
                    self.status.write_failures += 1
                    self.disk_error = f"{type(exc).__name__}: {exc}"
                    self._note_error("write", exc)
                    await self._report_write_failure()
                else:
                    self.status.redis_failures += 1
                    self._note_error("redis", exc)
            await asyncio.sleep(backoff)  # keep the batch: it is not acknowledged yet
            backoff = min(backoff * 2, 10.0)
            if disk_failed:
                await self._undo_until_clean(plan)
            # The plan may be stale after a failure (a file was forgotten): plan again.
            fresh = self.writer.plan(records)
            plan.parts, plan.new_files = fresh.parts, fresh.new_files

    async def _record_intent(self, plan: BatchPlan, field: str) -> None:
        intent = self._intent(plan)
        try:
            await self.redis.hset(self.keys.inflight, field, intent)
        except ResponseError as exc:
            if not is_oom(exc):
                raise
            await hset_at_oom(self.redis, self.keys.inflight, field, intent)

    async def _undo_until_clean(self, plan: BatchPlan) -> None:
        """Cut the files of a failed write back to their pre-batch sizes; retry until done."""
        parts = orjson.loads(self._intent(plan))["parts"]
        backoff = 0.2
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._executor, self.recovery.truncate_parts, parts)
                return
            except OSError as exc:
                self.status.write_failures += 1
                self.disk_error = f"{type(exc).__name__}: {exc}"
                self._note_error("write", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _report_write_failure(self) -> None:
        # Fleet-visible: a counter in the stats hash and this worker's health in its heartbeat.
        with contextlib.suppress(*_TRANSIENT):
            await self.redis.hincrby(self.keys.stats, "worker_write_errors", 1)
            await self._beat()

    async def _acknowledge(
        self,
        plan: BatchPlan,
        records: list[RecordEntry],
        ids: list[bytes],
        poison: list[tuple[bytes, dict[bytes, bytes], str]],
        gone: list[bytes],
        field: str,
    ) -> None:
        keys = self.keys
        all_ids = ids + [p[0] for p in poison] + gone
        if not all_ids:
            return
        hincr: Counter[str] = Counter()
        # One count per partition (the plan counted them), not per record.
        for (date, host), count in plan.partitions.items():
            hincr[f"requests:date:{date}"] += count
            hincr[f"requests:host:{host}"] += count
        hincr["requests"] = len(records)
        hincr["errors"] = plan.errors
        hincr["bytes"] = plan.nbytes
        hincr["files_created"] = plan.new_files
        hincr["dead_letters"] = len(poison)
        backoff = 0.1
        attempted = False
        while True:
            try:
                if attempted and not await self.redis.hexists(keys.inflight, field):
                    break  # the earlier EXEC went through; its reply was lost
                attempted = True
                letters = []
                for entry_id, fields, reason in poison:
                    dead = dict(fields)
                    dead.update({b"reason": reason.encode(), b"source_id": entry_id})
                    letters.append(dead)
                counters = {name: amount for name, amount in hincr.items() if amount}
                if not letters:
                    await self._ack_fast(all_ids, counters, field)
                    break
                pipe = self.redis.pipeline(transaction=True)
                for dead in letters:
                    pipe.xadd(keys.dead_letter, dead, maxlen=100_000, approximate=True)
                pipe.xack(keys.stream, keys.group, *all_ids)
                pipe.xdel(keys.stream, *all_ids)
                for name, amount in counters.items():
                    pipe.hincrby(keys.stats, name, amount)
                pipe.hdel(keys.inflight, field)
                try:
                    await pipe.execute()
                except ResponseError as exc:
                    if not is_oom(exc):
                        raise
                    # The same writes as one allow-oom script: acking frees the memory.
                    key_set = (keys.stream, keys.stats, keys.inflight, keys.dead_letter)
                    await ack_at_oom(
                        self.redis, key_set, keys.group, field, all_ids, counters, letters
                    )
                break
            except _TRANSIENT as exc:
                self.status.redis_failures += 1
                self._note_error("ack", exc)
                await asyncio.sleep(backoff)  # not cancellable by stop: the data is on disk
                backoff = min(backoff * 2, 5.0)
        self.status.batches += 1
        self.status.records += len(records)
        self.status.dead_letters += len(poison)
        self.status.last_batch_at = time.time()
        if poison:
            logger.warning("sent %d undeliverable entries to %s", len(poison), keys.dead_letter)

    async def _ack_fast(self, ids: list[bytes], counters: dict[str, int], field: str) -> None:
        """XACK + XDEL + counters + intent removal as one script call (atomic, like the
        MULTI/EXEC used with dead letters); the ids travel as one argument, not 2 x 1000."""
        keys = self.keys
        args: list[Any] = [keys.group, field, b",".join(ids)]
        for name, amount in counters.items():
            args += [name, amount]
        try:
            await self._ack_script(keys=[keys.stream, keys.stats, keys.inflight], args=args)
        except ResponseError as exc:
            if not is_oom(exc):
                raise
            # The same writes as one allow-oom script: acking frees the memory.
            key_set = (keys.stream, keys.stats, keys.inflight, keys.dead_letter)
            await ack_at_oom(self.redis, key_set, keys.group, field, ids, counters, [])

    def _note_error(self, kind: str, exc: BaseException) -> None:
        self.status.errors_by_kind[kind] += 1
        self.status.last_error = f"{kind}: {type(exc).__name__}: {exc}"
        count = self.status.errors_by_kind[kind]
        if count == 1 or count % 100 == 0:
            logger.warning("%s failed (%d times so far): %s", kind, count, exc)

    def health(self) -> dict[str, Any]:
        status = self.status
        return {
            "consumer": self.config.consumer,
            "batches": status.batches,
            "records": status.records,
            "dead_letters": status.dead_letters,
            "write_failures": status.write_failures,
            "redis_failures": status.redis_failures,
            "recovered_consumers": status.recovered_consumers,
            "last_error": status.last_error,
            "last_batch_at": status.last_batch_at,
            "disk_error": self.disk_error,
            "state": "disk_error" if self.disk_error else "ok",
        }
