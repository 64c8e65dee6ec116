"""The bounded buffer between the request path and a sink, and the thread that drains it.

`submit` is synchronous, O(1) and safe from any thread: it appends to a deque and, when a batch
is ready, wakes the shipping thread. That thread runs an event loop of its own (the *shipping
loop*), so the sink's I/O never waits for a turn of the app's loop: records leave memory at the
rate they are made even while the app's loop never yields. It is woken once per batch (or by
its `flush_interval` timer), never per record: a thread woken that often loses the GIL race to
a busy loop on every wake (`docs/benchmarks.md`); an app loop that keeps yielding lends it the
GIL when it falls behind (`_handoff.py`).
A failed batch is offered to the sink's backlog, if it has one (the spool, `SpoolingSink`); if
that cannot take it either, it stays at the head and is retried with backoff, so a slow or dead
sink costs the app nothing but buffer space; past the bound, new records are dropped and
counted, never silently.

What a killed process can lose: only what is in memory, i.e. at most `max_buffer` records, and
in steady state about one `flush_interval` (or one `batch_size`) worth of traffic, plus one
in-flight batch. `durable=True` callers wait (`wait_durable`) until their record left memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from .._exit import register
from .._record import RecordEntry
from ._handoff import Handoff
from ._ledger import Ledger
from ._shipping_settings import NO_COUNTS, BufferCounters, ShippingSettings, Tally, Unreported
from ._sink import Backlog, Sink, keep_all

__all__ = ["BufferCounters", "Shipper", "ShippingSettings", "Tally"]

logger = logging.getLogger("vllm_middleware")


class Shipper:
    """Owns the buffer and the shipping thread; `sink` says where a batch goes.

    `tally`: the counters, shared with sinks that count too (the spool counts what it
    spools, replays and drops); a fresh one if not given.
    """

    def __init__(
        self, sink: Sink, shipping: ShippingSettings | None = None, tally: Tally | None = None
    ) -> None:
        settings = shipping or ShippingSettings()
        self.sink = sink
        self._backlog = sink if isinstance(sink, Backlog) else None
        self.max_buffer = settings.max_buffer
        self.batch_size = settings.batch_size
        self.flush_interval = settings.flush_interval
        self.retry_backoff = settings.retry_backoff
        self.settings = settings
        self.tally = tally or Tally()
        self.counters = self.tally.counters
        self._full = f"log buffer full ({self.max_buffer} records)"
        self._pending: deque[RecordEntry] = deque()
        self._inflight: list[RecordEntry] = []
        # The counts the in-flight batch carries: they stay with it until it is shipped or
        # kept by the backlog (a flush that failed may have landed, counts included).
        self._inflight_counts = NO_COUNTS
        # The shipping loop and its thread, started by the first record (or by close).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None  # `_run`, on the shipping loop
        self._stopped: asyncio.Future[None] | None = None  # ends the thread
        self._close_future: concurrent.futures.Future[None] | None = None
        # Starting and closing (rare paths). Reentrant: a client's finalizer
        # (closing or releasing this sink) may run in any thread, inside any allocation.
        self._lock = threading.RLock()
        # `submit` from many threads at once (a sync client's thread pool): `+=` on an
        # attribute is not atomic, so the counts and the append are taken under this lock.
        self._submit_lock = threading.Lock()
        # Behind an app loop that keeps yielding the thread would rarely get the GIL.
        self._handoff = Handoff(max(1.25 * self.flush_interval, 0.01), self._handoff_arrived)
        self._waiting = False  # `_run` waits for its timer or a wake-up (not for the sink)
        self._asleep = False  # the shipping loop waits for a record, without a timer
        self._closing = False
        self._in_backlog = False  # `_run` is inside `work_backlog`
        self._closed = False
        self._ledger = Ledger(self._flush_now)  # what left memory, and who waits for that
        register(self)

    # -- request path -----------------------------------------------------------------------
    def submit(self, entry: RecordEntry) -> None:
        """Queue one encoded record. Never blocks, never raises for a full buffer. Safe from
        any thread."""
        pending = self._pending
        if self._inflight and len(pending) >= self.batch_size:
            # The buffer is backing up behind a batch the sink has not taken (slow or down),
            # so this record will be held a while: keep a right-sized copy. orjson's bytes keep
            # their whole output buffer allocated (~8 KiB held for a 1 KB record); the copy
            # costs ~0.5 µs, paid only here.
            entry = RecordEntry(
                entry.date, entry.host, entry.is_error, bytes(memoryview(entry.data))
            )
        lock = self._submit_lock
        lock.acquire()  # (not `with`: its two extra method calls cost ~650 instructions)
        try:
            self.counters.submitted += 1
            held = len(pending) + len(self._inflight)
            full = self._closed or held >= self.max_buffer
            if not full:
                pending.append(entry)
                self._ledger.accepted += 1
        finally:
            lock.release()
        if full:
            self._drop_one()
            return
        loop = self._loop
        if loop is None:
            self._start()
            return
        held = len(pending)
        if held == self.batch_size:
            self._wake()  # a full batch is ready: no need to wait for the timer
        elif self._asleep:  # the first record after a quiet spell: start the timer
            self._asleep = False
            self._handoff.beat = time.monotonic()
            self._wake()
        elif not held & 7:  # every 8 records: is the shipping thread keeping up?
            self._handoff.check(loop)

    def _drop_one(self) -> None:
        self.tally.count_dropped(1, self._full)

    def _handoff_arrived(self) -> bool:
        """On the shipping loop, a handoff from a busy app loop: flush now. True if `_run`
        was waiting (it reaches `Handoff.idle` again after this flush)."""
        if not self._waiting:
            return False  # busy with the sink, or backing off after a failure
        if self._wakeup is not None:
            self._wakeup.set()
        return True

    def count_sampled_out(self, count: int = 1) -> None:
        """Calls left out by `sample_rate`: counted here and in the fleet's statistics (the
        Redis sink adds them to the stats hash with its next batch). Safe from any thread."""
        self.tally.count_sampled_out(count)
        if self._asleep:  # an idle shipper reports them at its next flush, not in seconds
            self._asleep = False
            self._wake()

    def _wake(self) -> None:
        """Cut the shipping loop's wait short (from any thread)."""
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the sink is closed
                loop.call_soon_threadsafe(wakeup.set)

    @property
    def buffered(self) -> int:
        return len(self._pending) + len(self._inflight)

    async def wait_durable(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far has left memory (shipped, spooled or
        dropped and counted). False on timeout. Flushes at once instead of waiting for a batch.
        """
        if self._loop is None and self._ledger.owed:
            self._start()
        return await self._ledger.wait(self._loop, timeout)

    def flush_soon(self) -> None:
        """Ship what is buffered now rather than at the next timer (from any thread)."""
        self._ledger.flush_soon(self._loop)

    def _flush_now(self) -> None:
        """On the shipping loop: a waiter wants its records out now, not at the timer."""
        if self._wakeup is not None:
            self._wakeup.set()

    # -- the shipping thread ------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._loop is not None or self._closed:
            return
        loop = asyncio.new_event_loop()
        self._wakeup = asyncio.Event()  # binds to the loop that first waits on it
        self._loop = loop
        # A daemon: a non-daemon thread would be joined before `atexit` runs, so the exit
        # handler (`close_all`) could never ask it to save what it holds.
        thread = threading.Thread(
            target=self._thread_main, args=(loop,), name=f"vllm-mw-{type(self.sink).__name__}"
        )
        thread.daemon = True
        thread.start()

    def _thread_main(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            # Made before the loop runs, so a `close_soon` queued already finds them.
            self._stopped = stopped = loop.create_future()
            self._task = loop.create_task(self._run(), name=f"vllm-mw-{type(self.sink).__name__}")
            self._task.add_done_callback(_report_failure)
            loop.run_until_complete(stopped)
        except BaseException:  # never silent: this thread is the only one shipping records
            logger.exception("the log shipping thread failed")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def running(self) -> bool:
        """Its shipping thread is started and it is not closed."""
        return self._loop is not None and not self._closed

    def after_fork_in_child(self) -> None:
        """The shipping thread is the parent's (a child has none), and so are the records
        buffered before the fork: the parent ships them. Start afresh on the next record."""
        self._lock = threading.RLock()
        self._submit_lock = threading.Lock()
        self.tally.after_fork_in_child()
        self._loop = self._wakeup = self._task = self._stopped = self._close_future = None
        self._pending.clear()
        self._inflight = []
        self._inflight_counts = NO_COUNTS
        self._ledger.after_fork_in_child()
        self._asleep = False
        self._waiting = False
        self._handoff.reset()

    def _has_backlog(self) -> bool:
        return self._backlog is not None and self._backlog.has_backlog()

    async def _run(self) -> None:
        assert self._wakeup is not None
        backlog = self._backlog
        backoff = self.retry_backoff[0]
        # Closing: ship the buffer, then keep replaying a backlog (spool) while the sink can,
        # until done or aclose's time budget cancels us (the spool then waits on disk).
        handoff = self._handoff
        while not (
            self._closing and not self._inflight and not self._pending and not self._has_backlog()
        ):
            handoff.turn()  # a turn of ours: app loops waiting for one go on
            idle = not self._inflight and len(self._pending) < self.batch_size
            if not self._closing and idle and not (self._ledger.waiting and self.buffered):
                quiet = self._quiet_for()
                if quiet is not None:
                    # Nothing to ship: no timer every `flush_interval` (each wake of an idle
                    # client cost ~0.4 ms of CPU, and GIL races behind a busy app loop: see
                    # docs/benchmarks.md section 12). The first record (or count) wakes it
                    # (`submit`), then it waits one `flush_interval` for the batch to fill as
                    # usual; a backlog with nothing to send wakes it when it wants a turn.
                    self._asleep = self._waiting = True
                    handoff.idle()
                    if not self._pending:  # (a record submitted just before `_asleep`)
                        await self._sleep(quiet)
                    self._asleep = self._waiting = False
                    self._wakeup.clear()
                    if quiet == math.inf or self._pending:
                        continue
                else:
                    # With a backlog to replay, do not sleep between replayed batches.
                    wait = 0.0 if self._has_backlog() else self.flush_interval
                    if wait:
                        self._waiting = True
                        handoff.idle()
                        await self._sleep(wait)
                        self._waiting = False
                    self._wakeup.clear()
            if await self._flush_once():
                backoff = self.retry_backoff[0]
                if backlog is not None:
                    # Marked so `settle` waits for a replay step it sees half done: the spool
                    # says "empty" once the step committed, before its records are counted.
                    self._in_backlog = True
                    try:
                        await backlog.work_backlog()
                    finally:
                        self._in_backlog = False
                await asyncio.sleep(0)  # let the loop's other work (replies, probe) run
                continue
            # Wait out the backoff, but let close() cut it short.
            handoff.idle()
            await self._sleep(backoff)
            self._wakeup.clear()
            backoff = min(backoff * 2, self.retry_backoff[1])

    def _quiet_for(self) -> float | None:
        """How long an idle `_run` may sleep (inf: until woken); None: wait one
        `flush_interval` (records wait, or a backlog wants its turns)."""
        if self._pending:
            return None
        if self._backlog is None:
            return math.inf
        return None if self.tally.owed else self._backlog.quiet_for()

    async def _sleep(self, timeout: float) -> None:
        """Until a wake-up, or `timeout` seconds."""
        assert self._wakeup is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), None if timeout == math.inf else timeout)

    async def _flush_once(self) -> bool:
        """Ship the in-flight batch (taking one from the buffer if none). True on success."""
        if not self._inflight:
            held = len(self._pending)
            limit = self.batch_size
            if self._backlog is not None:
                limit = self._backlog.take_limit(limit)
            take = min(held, limit)
            if take == 0:
                await self._report_counts_alone()
                return True
            if held > self.counters.high_water:
                self.counters.high_water = held
            pop = self._pending.popleft
            self._inflight = [pop() for _ in range(take)]
        taken, counts = self.tally.take(), self._inflight_counts
        if taken != NO_COUNTS:
            counts = Unreported(
                counts.dropped + taken.dropped, counts.sampled_out + taken.sampled_out
            )
            self._inflight_counts = counts
        try:
            await self.sink.ship(
                self._inflight, dropped=counts.dropped, sampled_out=counts.sampled_out
            )
        except Exception as exc:  # any sink failure: keep the batch, retry later
            self.counters.failed_batches += 1
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            if self._backlog is not None and await self._backlog.keep(self._inflight, counts):
                self._ledger.resolve(len(self._inflight))
                self._inflight = []
                self._inflight_counts = NO_COUNTS
                return True
            if self.counters.failed_batches == 1 or self.counters.failed_batches % 100 == 0:
                logger.warning("log shipping failed (will retry): %s", self.counters.last_error)
            return False
        self.counters.shipped += len(self._inflight)
        self._ledger.resolve(len(self._inflight))
        self._inflight = []
        self._inflight_counts = NO_COUNTS
        return True

    async def _report_counts_alone(self) -> None:
        """Counts waiting for a batch to carry them while there is none: hand them to the
        sink, which then owes them (`Sink.report_counts`)."""
        counts: Unreported = self.tally.take()
        try:
            await self.sink.report_counts(counts.dropped, counts.sampled_out)
        except Exception as exc:  # owed still: the next idle flush tries again
            self.counters.last_error = f"counts: {type(exc).__name__}: {exc}"

    def count_dropped(self, count: int, why: str) -> None:
        """Records given up on purpose: counted, reported to Redis later, and logged."""
        self.tally.count_dropped(count, why)

    @property
    def healthy(self) -> bool | None:
        """Whether the sink's destination answers now (None: the sink does not track it)."""
        return self.sink.healthy

    async def aclose(self, timeout: float = 10.0) -> None:
        """Flush what is buffered (bounded by `timeout`), then stop the thread and the sink.

        Most of `timeout` goes to shipping normally; what is left after it is handed to the
        sink's backlog (the spool), which is a local disk write. Callable from any
        event loop; the work runs on the shipping loop.
        """
        await asyncio.wrap_future(self.close_soon(timeout))

    async def settle(self, timeout: float = 10.0) -> None:
        """What `aclose` does for the records, without closing (a shared sink a client lets
        go of): everything submitted so far leaves memory, and a backlog (spool) the sink can
        send now is sent, both within `timeout`. Callable from any event loop."""
        deadline = time.monotonic() + timeout
        if not await self.wait_durable(timeout):
            return
        loop = self._loop
        if loop is None or self.closing:
            return
        with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
            future = asyncio.run_coroutine_threadsafe(self._settle_here(deadline), loop)
            await asyncio.wrap_future(future)

    async def _settle_here(self, deadline: float) -> None:
        if self._backlog is not None:
            await self._backlog.recheck(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):  # includes asyncio.TimeoutError
            await asyncio.wait_for(
                self._report_counts_alone(), max(0.1, deadline - time.monotonic())
            )
        while (
            (self._has_backlog() or self._in_backlog)
            and not self._closing
            and time.monotonic() < deadline
        ):
            if self._wakeup is not None:
                self._wakeup.set()  # the flush loop replays without pausing while it lasts
            await asyncio.sleep(0.01)

    def close_soon(self, timeout: float = 10.0) -> concurrent.futures.Future[None]:
        """Start closing (from any thread, without waiting); the future ends when closed."""
        with self._lock:
            if self._close_future is None:
                self._start_locked()
                if self._loop is None:  # closed before a fork, in the parent
                    self._close_future = concurrent.futures.Future()
                    self._close_future.set_result(None)
                else:
                    self._close_future = asyncio.run_coroutine_threadsafe(
                        self._close_here(timeout), self._loop
                    )
            return self._close_future

    @property
    def closing(self) -> bool:
        """Closing or closed: takes no new users (records submitted now are dropped)."""
        return self._close_future is not None

    def close_later(self, delay: float, confirm: Callable[[], bool]) -> None:
        """Close after `delay` seconds if `confirm()` (asked then, on the shipping loop)."""
        with self._lock:
            loop = None if self._close_future is not None else self._loop
        if loop is None:
            if not self.closing and confirm():
                self.close_soon()
            return
        with contextlib.suppress(RuntimeError):  # its loop is closed: closed already
            loop.call_soon_threadsafe(loop.call_later, delay, self._close_if, confirm)

    def _close_if(self, confirm: Callable[[], bool]) -> None:
        if not self.closing and confirm():
            self.close_soon()

    async def _close_here(self, timeout: float) -> None:
        try:
            await self._close_on_loop(timeout)
        finally:
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)

    async def _close_on_loop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._closing = True
        if self._backlog is not None:
            timeout = await self._backlog.recheck(timeout)
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
        # Under the submit lock: a record is either appended before (and rescued with the
        # rest) or sees `_closed` (and is counted as dropped), from whatever thread.
        with self._submit_lock:
            self._closed = True
            # The in-flight batch apart from the rest: the sink may know it under an id (a
            # flush that may have landed), which must never cover records outside it.
            inflight, pending = self._inflight, list(self._pending)
            self._pending.clear()
            self._inflight = []
        counts, self._inflight_counts = self._inflight_counts, NO_COUNTS
        left = len(inflight) + len(pending)
        saved = 0
        if left:
            with contextlib.suppress(Exception):  # includes asyncio.TimeoutError
                saved = await asyncio.wait_for(
                    keep_all(self._backlog, inflight, counts, pending),
                    max(0.1, deadline - time.monotonic()),
                )
            if left > saved:
                self.count_dropped(left - saved, "closed with unshipped log records")
            self._ledger.resolve(left)
        if counts != NO_COUNTS and (not inflight or saved == 0):
            self.tally.give_back(counts)  # the backlog did not take them: reported below
        with contextlib.suppress(Exception):  # includes asyncio.TimeoutError
            await asyncio.wait_for(
                self._report_counts_alone(), max(0.1, deadline - time.monotonic())
            )
        await self.sink.aclose()


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Records now wait in the buffer (and are dropped, counted, once it is full).
        logger.error("log shipping stopped", exc_info=task.exception())
