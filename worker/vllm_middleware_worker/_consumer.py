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
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from vllm_middleware.storage import (
    BUNDLE_BYTES,
    BUNDLE_RECORDS,
    BatchPlan,
    PartitionLines,
    PartitionWriter,
    StreamKeys,
)

from ._ack import Acknowledger, batch_counters, dead_letter_entries, is_damaged_stats
from ._config import WorkerConfig
from ._entries import DeadLetter, Entry, EntrySorter, SortedBatch
from ._intent import Cut, encode_intent
from ._oom import group_create_at_oom, hset_at_oom, is_oom, set_px_at_oom
from ._recovery import Recovery, intent_fields
from ._status import ConsumerStatus

__all__ = ["ConsumerStatus", "StreamConsumer"]

logger = logging.getLogger("vllm_middleware_worker")
_HOST = socket.gethostname()  # in the heartbeat: `vllm-mw health --host` filters on it

# Errors that a retry can outlive: Redis unreachable or restarting, disk errors, and error
# replies (OOM at `maxmemory`, READONLY during a failover, NOGROUP after a Redis lost its
# data): the batch is kept, retried with backoff and reported, and the consumer never dies of it.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, ResponseError)


def _reply_as_is(response: Any, **options: Any) -> Any:
    """A reply callback that leaves the parsed reply as the protocol parser returned it."""
    return response


class _StopRequested(Exception):
    """A retry loop gave up because the worker is stopping: the batch stays pending, with its
    intent, for the next worker (or this one's next life) to undo and write again."""


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
            modes=config.modes,
        )
        self.status = ConsumerStatus()
        self.recovery = Recovery(redis, config, self)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-mw-write")
        # The same connections, but XREADGROUP replies left as hiredis returns them: redis-py's
        # reply callback builds a dict per entry; `EntrySorter` reads the fixed field order our
        # clients write instead, and falls back to a dict for anything else.
        self._raw = aioredis.Redis(connection_pool=redis.connection_pool)
        self._raw.set_response_callback("XREADGROUP", _reply_as_is)
        self._acker = Acknowledger(redis, self.keys)
        self._sorter = EntrySorter(config.max_record_bytes)
        # Entries per XREADGROUP: about `batch_size` records or `batch_bytes`, whatever the
        # bundles hold (sized from the previous batch). The first read assumes full bundles.
        self._read_count = max(
            1, min(config.batch_size // BUNDLE_RECORDS, config.batch_bytes // BUNDLE_BYTES)
        )
        # The next batch's XREADGROUP, sent while this batch is written and acknowledged, so
        # Redis's read time and the reply's parsing overlap the write + fsync.
        self._prefetch: asyncio.Task[SortedBatch | None] | None = None
        # The previous batch's acknowledgement, running while this batch is written. Each of
        # the (at most) two unacknowledged batches has its own intent field (`_slot`).
        self._ack_task: asyncio.Task[None] | None = None
        self._slot = 0
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        self._own_pending = True  # re-read our own pending entries after a start or an error
        # Undo a previous life's unacknowledged batch: once per start or error, with no ack of
        # ours in flight. Not on every pass that re-reads pending entries: the batch just
        # rewritten from them would still be in its intent, its ack in flight, and cutting it
        # while the ack then removes its entries from the stream would lose it.
        self._undo_pending = True
        self.disk_error: str | None = None  # set while writes fail, cleared by the next success
        self.ack_error: str | None = None  # set while acknowledgements are refused
        #: called with each batch's seconds from write to acknowledgement (metrics); off if None
        self.batch_observer: Callable[[float], None] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, burst: bool = False) -> None:
        """Consume until `stop()`; with `burst`, return once the stream is drained."""
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="vllm-mw-heartbeat")
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                try:
                    if self._undo_pending:
                        await self._ensure_group()
                        await self._beat()
                        # A previous life of this consumer may have died mid-batch.
                        if await self.recovery.undo_intent(self.config.consumer):
                            await self._forget_files()
                        self._undo_pending = False
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
                except _StopRequested:
                    break
                except _TRANSIENT as exc:
                    self._note_error("redis", exc)
                    self.status.redis_failures += 1
                    # Our pending entries are re-read next: a batch being acknowledged must
                    # be done first (it retries until it is), or it would be read again.
                    await self._settle_ack()
                    self._own_pending = True  # re-reads whatever a prefetch had taken
                    self._undo_pending = True
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
                with contextlib.suppress(_StopRequested, *_TRANSIENT):
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

    async def _forget_files(self) -> None:
        """Close our open files after they were cut back behind the writer's back: it would
        otherwise plan the next batches (and record their intents) at the old sizes."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self.writer.close)

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
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            with contextlib.suppress(*_TRANSIENT):
                await self._beat()
            # In the writer's own thread, between batches (the writer is not thread-safe).
            with contextlib.suppress(OSError):
                idle = self.config.file_idle_s
                await loop.run_in_executor(self._executor, self.writer.close_idle, idle)

    async def _drained(self) -> bool:
        groups = await self.redis.xinfo_groups(self.keys.stream)
        for group in groups:
            if group["name"] in (self.keys.group, self.keys.group.encode()):
                return bool(group["pending"] == 0 and group.get("lag") in (0, None))
        return True

    # -- batches ----------------------------------------------------------------------------
    async def _read(self, start: bytes, *, block: bool = False) -> list[Entry]:
        args: list[Any] = ["XREADGROUP", "GROUP", self.keys.group, self.config.consumer]
        args += ["COUNT", self._read_count]
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
        await self.process(entries, dead_letter_reasons=too_often, read_ahead=start == b">")
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
        dead_letter_reasons: dict[bytes, str] | None = None,
        read_ahead: bool = False,
    ) -> None:
        """Write a batch durably, then acknowledge it; retries until both are done.

        `entries` hold each entry's fields as a dict or as the flat [field, value, ...] list
        of a raw reply. `dead_letter_reasons` names entries to send to the dead-letter stream
        whatever they hold (e.g. delivered too often), with the reason.
        """
        await self._process_sorted(self._sort(entries, dead_letter_reasons), read_ahead=read_ahead)

    async def _process_sorted(self, batch: SortedBatch, *, read_ahead: bool = False) -> None:
        """Write the batch (its own intent field), then start its acknowledgement, which runs
        while the next batch is read and written; the previous one must be done first."""
        lines, letters = batch.lines, batch.dead_letters
        plan = self.writer.plan(lines)
        if read_ahead and self._prefetch is None and not self._stopping.is_set():
            self._prefetch = asyncio.create_task(self._read_sorted(), name="vllm-mw-read-ahead")
        field = intent_fields(self.config.consumer)[self._slot]
        self._slot ^= 1
        started = time.monotonic()
        await self._write_durably(plan, lines, field, batch.ids)
        # Before this batch's ack, and before the next batch reuses the previous one's field.
        await self._settle_ack()
        ack = self._acknowledge(plan, batch.ids, letters, field, started)
        if letters:
            await ack  # dead letters: rare, keep them simple
        else:
            self._ack_task = asyncio.create_task(ack, name="vllm-mw-ack")

    async def _settle_ack(self) -> None:
        """Wait for the previous batch's acknowledgement (it retries until it is done)."""
        task, self._ack_task = self._ack_task, None
        if task is not None:
            await task

    def _sort(
        self, entries: Sequence[Entry], dead_letter_reasons: dict[bytes, str] | None
    ) -> SortedBatch:
        batch = self._sorter.sort(list(entries), dead_letter_reasons)
        # Size the next read from this one: bundles of 60 records would otherwise make a
        # batch of `batch_size` entries 60 times the memory (and the fsync interval).
        if batch.ids and batch.nbytes:
            read = len(batch.ids)
            by_records = self.config.batch_size * read / max(1, batch.lines.total)
            by_bytes = self.config.batch_bytes * read / batch.nbytes
            self._read_count = max(1, min(self.config.batch_size, int(min(by_records, by_bytes))))
        return batch

    async def _read_sorted(self) -> SortedBatch | None:
        """Read ahead: the next batch, already sorted (runs while the current one is written)."""
        entries = await self._read(b">")
        return self._sort(entries, None) if entries else None

    def _parts(self, plan: BatchPlan) -> list[tuple[str, int, int]]:
        # Paths relative to log_dir: a recovering worker may have another working directory.
        root = self.writer.log_dir
        return [(p.path.relative_to(root).as_posix(), p.offset, len(p.data)) for p in plan.parts]

    def _intent(self, plan: BatchPlan, ids: list[bytes]) -> bytes:
        return encode_intent(ids, self._parts(plan))

    async def _write_durably(
        self, plan: BatchPlan, lines: PartitionLines, field: str, ids: list[bytes]
    ) -> None:
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
                await self._record_intent(self._intent(plan, ids), field)
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
            await self._sleep(backoff)  # keep the batch: it is not acknowledged yet
            backoff = min(backoff * 2, 10.0)
            if self._stopping.is_set():
                raise _StopRequested  # the intent covers whatever the failed write left
            if disk_failed:
                await self._undo_until_clean(plan)
            # The plan may be stale after a failure (a file was forgotten): plan again.
            fresh = self.writer.plan(lines)
            plan.parts, plan.new_files = fresh.parts, fresh.new_files

    async def _record_intent(self, intent: bytes, field: str) -> None:
        try:
            await self.redis.hset(self.keys.inflight, field, intent)
        except ResponseError as exc:
            if not is_oom(exc):
                raise
            await hset_at_oom(self.redis, self.keys.inflight, field, intent)

    async def _undo_until_clean(self, plan: BatchPlan) -> None:
        """Cut the files of a failed write back to their pre-batch sizes; retry until done."""
        cuts = [Cut(path, offset) for path, offset, _ in self._parts(plan)]
        backoff = 0.2
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._executor, self.recovery.apply_cuts, cuts)
                return
            except OSError as exc:
                self.status.write_failures += 1
                self.disk_error = f"{type(exc).__name__}: {exc}"
                self._note_error("undo", exc)
                await self._report_write_failure()
                await self._sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                if self._stopping.is_set():
                    raise _StopRequested from exc

    async def _report_write_failure(self) -> None:
        # Fleet-visible: a counter in the stats hash and this worker's health in its heartbeat.
        with contextlib.suppress(*_TRANSIENT):
            await self.redis.hincrby(self.keys.stats, "worker_write_errors", 1)
            await self._beat()

    async def _report_ack_failure(self) -> None:
        with contextlib.suppress(*_TRANSIENT):
            await self.redis.hincrby(self.keys.stats, "worker_ack_errors", 1)
            await self._beat()

    async def _acknowledge(
        self,
        plan: BatchPlan,
        all_ids: list[bytes],
        letters: list[DeadLetter],
        field: str,
        started: float | None = None,
    ) -> None:
        if not all_ids:
            return
        counters = batch_counters(plan, letters)
        entries = dead_letter_entries(letters)
        backoff = 0.1
        attempted = False
        while True:
            try:
                if attempted and not await self.redis.hexists(self.keys.inflight, field):
                    break  # the earlier attempt went through; its reply was lost
                attempted = True
                await self._acker.send(all_ids, counters, entries, field)
                break
            except _TRANSIENT as exc:
                self.status.redis_failures += 1
                self._note_error("ack", exc)
                refused = is_damaged_stats(exc)
                if refused:
                    # Nothing was acknowledged; retrying cannot help until a person repairs
                    # the stats hash: say so everywhere, and wait longer between attempts.
                    self.ack_error = str(exc)
                    logger.error("acknowledgement refused, batch kept pending: %s", exc)
                    await self._report_ack_failure()
                if self._stopping.is_set():
                    # Safe to leave: the intent is removed only together with the ack, so
                    # either both happened or the next worker undoes and redoes the batch.
                    logger.warning("stopping with a written batch not acknowledged (redone later)")
                    return
                await self._sleep(backoff)
                backoff = min(backoff * 2, 30.0 if refused else 5.0)
        self.ack_error = None
        self.status.batches += 1
        self.status.records += plan.records
        self.status.bytes += plan.nbytes
        self.status.dead_letters += counters.get("dead_letters", 0)
        self.status.last_batch_at = time.time()
        if self.batch_observer is not None and started is not None:
            self.batch_observer(time.monotonic() - started)
        if letters:
            logger.warning("dead-lettered %d entries or records", len(letters))

    def _note_error(self, kind: str, exc: BaseException) -> None:
        self.status.note_error(kind, exc)

    def health(self) -> dict[str, Any]:
        return self.status.health(
            self.config.consumer, self.disk_error, self.ack_error, host=_HOST, pid=os.getpid()
        )
