"""The bounded buffer between the request path and a sink, and the task that drains it.

`submit` is synchronous and O(1): it appends to a deque and, when a batch is ready, sets an
event. A background task takes batches off the buffer and hands them to the sink's `ship`. A
failed batch stays at the head and is retried with backoff, so a slow or dead sink costs the app
nothing but buffer space; past the bound, new records are dropped and counted, never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

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


@dataclass
class BufferCounters:
    submitted: int = 0
    shipped: int = 0
    dropped: int = 0
    failed_batches: int = 0
    last_error: str | None = None


class Shipper(ABC):
    """Owns the buffer and the flush task; subclasses say where a batch goes."""

    def __init__(self, shipping: ShippingSettings | None = None) -> None:
        settings = shipping or ShippingSettings()
        self.max_buffer = settings.max_buffer
        self.batch_size = settings.batch_size
        self.flush_interval = settings.flush_interval
        self.retry_backoff = settings.retry_backoff
        self.counters = BufferCounters()
        self._pending: deque[RecordEntry] = deque()
        self._inflight: list[RecordEntry] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._unreported_drops = 0

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
        self._pending.append(entry)
        if self._task is None:
            self._start()
        elif len(self._pending) >= self.batch_size and self._wakeup is not None:
            self._wakeup.set()

    @property
    def buffered(self) -> int:
        return len(self._pending) + len(self._inflight)

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
        while not (self._closing and not self._inflight and not self._pending):
            if not self._closing and not self._inflight and len(self._pending) < self.batch_size:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.flush_interval)
                self._wakeup.clear()
            if await self._flush_once():
                backoff = self.retry_backoff[0]
                continue
            # Wait out the backoff, but let close() cut it short.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), backoff)
            self._wakeup.clear()
            backoff = min(backoff * 2, self.retry_backoff[1])

    async def _flush_once(self) -> bool:
        """Ship the in-flight batch (taking one from the buffer if none). True on success."""
        if not self._inflight:
            take = min(len(self._pending), self.batch_size)
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
            if self.counters.failed_batches == 1 or self.counters.failed_batches % 100 == 0:
                logger.warning("log shipping failed (will retry): %s", self.counters.last_error)
            return False
        self.counters.shipped += len(self._inflight)
        self._inflight = []
        return True

    async def aclose(self, timeout: float = 10.0) -> None:
        """Flush what is buffered (bounded by `timeout`), then stop the task and the sink."""
        if self._closed:
            return
        self._closing = True
        if self._task is None and self.buffered:
            self._start()
        if self._task is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        self._closed = True
        lost = self.buffered
        if lost:
            self.counters.dropped += lost
            logger.warning("closed with %d unshipped log records: they are lost", lost)
            self._pending.clear()
            self._inflight = []
        await self.close_sink()

    # -- sink -------------------------------------------------------------------------------
    @abstractmethod
    async def ship(self, batch: list[RecordEntry], *, dropped: int) -> None:
        """Make `batch` durable at the destination, or raise. `dropped`: drops to report."""

    @abstractmethod
    async def close_sink(self) -> None:
        """Release what the sink created (not what was injected)."""
