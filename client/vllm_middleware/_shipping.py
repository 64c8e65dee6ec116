"""The bounded buffer between the request path and a sink, and the task that drains it.

`submit` is synchronous and O(1): it appends to a deque and, when a batch is ready, sets an
event. A background task takes batches off the buffer and hands them to the sink's `ship`. A
failed batch is offered to the sink's `on_ship_failed` (the Redis sink spools it to disk); if the
sink cannot take it either, it stays at the head and is retried with backoff, so a slow or dead
sink costs the app nothing but buffer space; past the bound, new records are dropped and
counted, never silently.

What a killed process can lose: only what is in memory, i.e. at most `max_buffer` records, and
in steady state about one `flush_interval` (or one `batch_size`) worth of traffic, plus one
in-flight batch. `durable=True` callers wait (`wait_durable`) until their record left memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from ._record import RecordEntry

__all__ = ["BufferCounters", "Shipper", "ShippingSettings"]

logger = logging.getLogger("vllm_middleware")


@dataclass(frozen=True)
class ShippingSettings:
    """How records wait between the request path and the sink."""

    max_buffer: int = 50_000  # records held in memory at most; beyond, dropped and counted
    batch_size: int = 500  # records per flush at most
    flush_interval: float = 0.05  # seconds a partial batch may wait
    retry_backoff: tuple[float, float] = (0.05, 5.0)  # first and largest pause after a failure
    # -- Redis sink only: the on-disk spool and the timeouts (defaults from VLLM_MW_* env) --
    #: spool batches Redis did not take (env VLLM_MW_SPOOL=0 turns it off)
    spool: bool = field(default_factory=lambda: _env_flag("VLLM_MW_SPOOL", True))
    #: spool root (env VLLM_MW_SPOOL_DIR, default ~/.cache/vllm-middleware/spool)
    spool_dir: str | None = field(default_factory=lambda: os.environ.get("VLLM_MW_SPOOL_DIR"))
    #: spool size bound; beyond it batches are dropped and counted (env VLLM_MW_SPOOL_MAX_MB)
    spool_max_mb: float = field(default_factory=lambda: _env_float("VLLM_MW_SPOOL_MAX_MB", 1024))
    spool_fsync: bool = True  # fsync every spooled batch before it counts as durable
    #: seconds one Redis flush may take before the batch goes to the spool (env
    #: VLLM_MW_REDIS_TIMEOUT); the request path never waits for it
    redis_timeout: float = field(default_factory=lambda: _env_float("VLLM_MW_REDIS_TIMEOUT", 2.0))
    #: wait for each record to be durable (Redis or spool) before the call returns
    durable: bool = field(default_factory=lambda: _env_flag("VLLM_MW_DURABLE", False))
    # -- embedded sink only --
    #: who writes the files (env VLLM_MW_EMBEDDED_WRITER): "process" (a writer process beside
    #: the app), "thread" (a thread in the app), or "auto": the process where it can start
    embedded_writer: str = field(
        default_factory=lambda: os.environ.get("VLLM_MW_EMBEDDED_WRITER", "auto").strip() or "auto"
    )


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in ("0", "false", "no", "off")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


@dataclass
class BufferCounters:
    submitted: int = 0
    shipped: int = 0
    dropped: int = 0
    failed_batches: int = 0
    last_error: str | None = None
    spooled: int = 0  # records written to the spool
    replayed: int = 0  # spooled records shipped to Redis since
    spool_damaged: int = 0  # damaged spool regions skipped (each a torn or corrupted frame)
    spool_bytes: int = 0  # bytes in the spool now


class Shipper(ABC):
    """Owns the buffer and the flush task; subclasses say where a batch goes."""

    def __init__(self, shipping: ShippingSettings | None = None) -> None:
        settings = shipping or ShippingSettings()
        self.max_buffer = settings.max_buffer
        self.batch_size = settings.batch_size
        self.flush_interval = settings.flush_interval
        self.retry_backoff = settings.retry_backoff
        self.settings = settings
        self.counters = BufferCounters()
        self._pending: deque[RecordEntry] = deque()
        self._inflight: list[RecordEntry] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._unreported_drops = 0
        # `durable` support: records accepted so far, and how many of them left memory (shipped,
        # spooled or dropped); batches leave in order, so one counter pair is enough.
        self._accepted = 0
        self._resolved = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- request path -----------------------------------------------------------------------
    def submit(self, entry: RecordEntry) -> None:
        """Queue one encoded record. Never blocks, never raises for a full buffer."""
        counters = self.counters
        counters.submitted += 1
        if self._closed or len(self._pending) + len(self._inflight) >= self.max_buffer:
            counters.dropped += 1
            self._unreported_drops += 1
            if counters.dropped == 1 or counters.dropped % 10_000 == 0:
                logger.warning(
                    "log buffer full (%d records): %d records dropped so far",
                    self.max_buffer,
                    counters.dropped,
                )
            return
        pending = self._pending
        if self._inflight and len(pending) >= self.batch_size:
            # The buffer is backing up behind a batch the sink has not taken (slow or down),
            # so this record will be held a while: keep a right-sized copy. orjson's bytes keep
            # their whole output buffer allocated (~8 KiB held for a 1 KB record); the copy
            # costs ~0.5 µs, paid only here.
            entry = RecordEntry(
                entry.date, entry.host, entry.is_error, bytes(memoryview(entry.data))
            )
        pending.append(entry)
        self._accepted += 1
        if self._task is None:
            self._start()
        elif len(pending) == self.batch_size and self._wakeup is not None:
            self._wakeup.set()  # a full batch is ready: no need to wait for the timer

    @property
    def buffered(self) -> int:
        return len(self._pending) + len(self._inflight)

    async def wait_durable(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far has left memory (shipped, spooled or
        dropped and counted). False on timeout. Flushes at once instead of waiting for a batch.
        """
        target = self._accepted
        if self._resolved >= target:
            return True
        if self._task is None:
            self._start()
        if self._wakeup is not None:
            self._wakeup.set()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        return False

    def _resolve(self, count: int) -> None:
        self._resolved += count
        if not self._waiters:
            return
        done = self._resolved
        keep = []
        for target, future in self._waiters:
            if target <= done:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((target, future))
        self._waiters = keep

    # -- background task --------------------------------------------------------------------
    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the records wait in the buffer until one runs
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"vllm-mw-{type(self).__name__}")

    async def _run(self) -> None:
        assert self._wakeup is not None
        backoff = self.retry_backoff[0]
        # Closing: ship the buffer, then keep replaying a backlog (spool) while the sink can,
        # until done or aclose's time budget cancels us (the spool then waits on disk).
        while not (
            self._closing and not self._inflight and not self._pending and not self.has_backlog()
        ):
            idle = not self._inflight and len(self._pending) < self.batch_size
            if not self._closing and idle and not (self._waiters and self.buffered):
                # With a backlog to replay, do not sleep between replayed batches.
                wait = 0.0 if self.has_backlog() else self.flush_interval
                if wait:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                self._wakeup.clear()
            if await self._flush_once():
                backoff = self.retry_backoff[0]
                await self.work_backlog()
                await asyncio.sleep(0)  # let the request path run between batches
                continue
            # Wait out the backoff, but let close() cut it short.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), backoff)
            self._wakeup.clear()
            backoff = min(backoff * 2, self.retry_backoff[1])

    async def _flush_once(self) -> bool:
        """Ship the in-flight batch (taking one from the buffer if none). True on success."""
        if not self._inflight:
            take = min(len(self._pending), self.take_limit())
            if take == 0:
                return True
            pop = self._pending.popleft
            self._inflight = [pop() for _ in range(take)]
        drops, self._unreported_drops = self._unreported_drops, 0
        try:
            await self.ship(self._inflight, dropped=drops)
        except asyncio.CancelledError:
            self._unreported_drops += drops
            raise
        except Exception as exc:  # any sink failure: keep the batch, retry later
            self._unreported_drops += drops
            self.counters.failed_batches += 1
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            if await self.on_ship_failed(self._inflight, exc):
                self._resolve(len(self._inflight))
                self._inflight = []
                return True
            if self.counters.failed_batches == 1 or self.counters.failed_batches % 100 == 0:
                logger.warning("log shipping failed (will retry): %s", self.counters.last_error)
            return False
        self.counters.shipped += len(self._inflight)
        self._resolve(len(self._inflight))
        self._inflight = []
        return True

    def count_dropped(self, count: int, why: str) -> None:
        """Records given up on purpose: counted, reported to Redis later, and logged."""
        counters = self.counters
        before = counters.dropped
        counters.dropped += count
        self._unreported_drops += count
        if before == 0 or before // 10_000 != counters.dropped // 10_000:
            logger.warning("%s: %d log records dropped so far", why, counters.dropped)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Flush what is buffered (bounded by `timeout`), then stop the task and the sink.

        Most of `timeout` goes to shipping normally; what is left after it is handed to
        `rescue` (the Redis sink spools it), which is a local disk write.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self._closing = True
        if self._task is None and self.buffered:
            self._start()
        if self._task is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            budget = max(0.0, timeout - min(1.0, timeout / 4))
            try:
                await asyncio.wait_for(asyncio.shield(self._task), budget)
            except Exception:  # asyncio.TimeoutError (or the task failed): stop it
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        self._closed = True
        # The in-flight batch apart from the rest: the sink may know it under an id (a flush
        # that may have landed), which must never cover records outside it (see `rescue`).
        inflight, pending = self._inflight, list(self._pending)
        self._pending.clear()
        self._inflight = []
        left = len(inflight) + len(pending)
        if left:
            try:
                saved = await asyncio.wait_for(
                    self.rescue(inflight, pending), max(0.1, deadline - time.monotonic())
                )
            except Exception:  # includes asyncio.TimeoutError
                saved = 0
            if left > saved:
                self.count_dropped(left - saved, "closed with unshipped log records")
            self._resolve(left)
        await self.close_sink()

    # -- hooks (the Redis sink overrides them) -----------------------------------------------
    async def on_ship_failed(self, batch: list[RecordEntry], exc: Exception) -> bool:
        """Take care of a batch `ship` failed on (True), or leave it to be retried (False)."""
        return False

    def take_limit(self) -> int:
        """Records to take off the buffer for the next `ship`."""
        return self.batch_size

    def has_backlog(self) -> bool:
        """True while the sink has older records of its own to send (a spool to replay)."""
        return False

    async def work_backlog(self) -> None:
        """Send a little of the backlog; called between live batches, must not raise."""
        return None

    async def rescue(self, inflight: list[RecordEntry], pending: list[RecordEntry]) -> int:
        """At close, save what could not be shipped in time: the in-flight batch (possibly
        already attempted), then the buffer in order. Returns how many records were saved.
        """
        return 0

    # -- sink -------------------------------------------------------------------------------
    @abstractmethod
    async def ship(self, batch: list[RecordEntry], *, dropped: int) -> None:
        """Make `batch` durable at the destination, or raise. `dropped`: drops to report."""

    @abstractmethod
    async def close_sink(self) -> None:
        """Release what the sink created (not what was injected)."""
