"""The stream consumer: read a batch, write it durably, then acknowledge it with the statistics.

Per batch: XREADGROUP -> validate -> plan files -> record the plan (the "intent") in Redis ->
append + fsync -> one MULTI/EXEC with XACK, XDEL, the counters and the intent's removal. If the
worker dies after the write and before the EXEC, the intent says which bytes of which files that
batch may have written; whoever recovers the dead worker's entries first truncates those files
back (see `_recovery.py`), so the retried batch never leaves a duplicate line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from ._recovery import Recovery

__all__ = ["ConsumerStatus", "StreamConsumer"]

logger = logging.getLogger("vllm_middleware_worker")

# Errors that a retry can outlive: Redis unreachable or restarting, disk errors, and error
# replies (OOM at `maxmemory`, READONLY during a failover, NOGROUP after a Redis lost its
# data): the batch is kept, retried with backoff and reported, and the consumer never dies of it.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, ResponseError)
_MAX_HOST_LEN = 1024

Entry = tuple[bytes, dict[bytes, bytes] | None]


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
                    if burst and not handled and await self._drained():
                        return
                    backoff = 0.1
                except _TRANSIENT as exc:
                    self._note_error("redis", exc)
                    self.status.redis_failures += 1
                    self._own_pending = True
                    # After an outage (a Redis restart expires heartbeat keys by wall clock)
                    # every peer looks dead until its next beat: give them one TTL to beat
                    # again before taking anyone's entries.
                    self._next_claim = max(
                        self._next_claim, time.monotonic() + self.config.heartbeat_ttl_s
                    )
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
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
    async def _consume(self, start: bytes, *, block: bool = False) -> bool:
        response = await self.redis.xreadgroup(
            self.keys.group,
            self.config.consumer,
            {self.keys.stream: start},
            count=self.config.batch_size,
            block=self.config.block_ms if block else None,
        )
        if not response:
            return False
        entries: list[Entry] = response[0][1]
        if not entries:
            return False
        too_often = await self._delivered_too_often(entries) if start == b"0" else None
        await self.process(entries, undeliverable=too_often)
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
        self, entries: Sequence[Entry], *, undeliverable: dict[bytes, str] | None = None
    ) -> None:
        """Write a batch durably, then acknowledge it; retries until both are done.

        `undeliverable` names entries to send to the dead-letter stream whatever they hold
        (e.g. delivered too often), with the reason.
        """
        good_ids: list[bytes] = []
        records: list[RecordEntry] = []
        poison: list[tuple[bytes, dict[bytes, bytes], str]] = []
        gone: list[bytes] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending (trimmed by an operator): nothing to write
                gone.append(entry_id)
                continue
            if undeliverable and entry_id in undeliverable:
                poison.append((entry_id, fields, undeliverable[entry_id]))
                continue
            record, reason = self._validate(fields)
            if record is None:
                poison.append((entry_id, fields, reason))
            else:
                good_ids.append(entry_id)
                records.append(record)
        plan = self.writer.plan(records)
        await self._write_durably(plan, records)
        await self._acknowledge(plan, records, good_ids, poison, gone)

    def _validate(self, fields: dict[bytes, bytes]) -> tuple[RecordEntry | None, str]:
        data = fields.get(FIELD_RECORD)
        if data is None:
            return None, "missing record field"
        if len(data) > self.config.max_record_bytes:
            return None, f"record of {len(data)} bytes exceeds max_record_bytes"
        try:
            date = fields[FIELD_DATE].decode("ascii")
            host = fields[FIELD_HOST].decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None, "missing or undecodable date/host field"
        if not is_valid_date(date):
            return None, f"invalid date partition {date[:40]!r}"
        if not host or len(host) > _MAX_HOST_LEN or "\x00" in host:
            return None, "invalid host partition"
        if not data.startswith(b"{") or not data.endswith(b"}") or b"\n" in data:
            # Lines must stay whole JSON objects; a newline would split one record in two.
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                return None, "record is not valid JSON"
            if not isinstance(parsed, dict):
                return None, "record is not a JSON object"
            data = orjson.dumps(parsed)
        is_error = fields.get(FIELD_ERROR, b"0") == b"1"
        return RecordEntry(date, host, is_error, data), ""

    def _intent(self, plan: BatchPlan) -> bytes:
        # Paths relative to log_dir: a recovering worker may have another working directory.
        root = self.writer.log_dir
        return orjson.dumps(
            {"parts": [[str(p.path.relative_to(root)), p.offset] for p in plan.parts]}
        )

    async def _write_durably(self, plan: BatchPlan, records: list[RecordEntry]) -> None:
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
                await self._record_intent(plan)
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

    async def _record_intent(self, plan: BatchPlan) -> None:
        intent = self._intent(plan)
        try:
            await self.redis.hset(self.keys.inflight, self.config.consumer, intent)
        except ResponseError as exc:
            if not is_oom(exc):
                raise
            await hset_at_oom(self.redis, self.keys.inflight, self.config.consumer, intent)

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
    ) -> None:
        keys = self.keys
        all_ids = ids + [p[0] for p in poison] + gone
        if not all_ids:
            return
        hincr: Counter[str] = Counter()
        for record in records:
            hincr[f"requests:date:{record.date}"] += 1
            hincr[f"requests:host:{record.host}"] += 1
        hincr["requests"] = len(records)
        hincr["errors"] = sum(r.is_error for r in records)
        hincr["bytes"] = plan.nbytes
        hincr["files_created"] = plan.new_files
        hincr["dead_letters"] = len(poison)
        backoff = 0.1
        attempted = False
        while True:
            try:
                if attempted and not await self.redis.hexists(keys.inflight, self.config.consumer):
                    break  # the earlier EXEC went through; its reply was lost
                attempted = True
                letters = []
                for entry_id, fields, reason in poison:
                    dead = dict(fields)
                    dead.update({b"reason": reason.encode(), b"source_id": entry_id})
                    letters.append(dead)
                counters = {name: amount for name, amount in hincr.items() if amount}
                pipe = self.redis.pipeline(transaction=True)
                for dead in letters:
                    pipe.xadd(keys.dead_letter, dead, maxlen=100_000, approximate=True)
                pipe.xack(keys.stream, keys.group, *all_ids)
                pipe.xdel(keys.stream, *all_ids)
                for name, amount in counters.items():
                    pipe.hincrby(keys.stats, name, amount)
                pipe.hdel(keys.inflight, self.config.consumer)
                try:
                    await pipe.execute()
                except ResponseError as exc:
                    if not is_oom(exc):
                        raise
                    # The same writes as one allow-oom script: acking frees the memory.
                    key_set = (keys.stream, keys.stats, keys.inflight, keys.dead_letter)
                    await ack_at_oom(
                        self.redis, key_set, keys.group, self.config.consumer,
                        all_ids, counters, letters,
                    )  # fmt: skip
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
