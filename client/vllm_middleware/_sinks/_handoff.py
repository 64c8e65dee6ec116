"""Lending the GIL to the shipping thread from a busy app loop that keeps yielding.

A thread waiting for the GIL asks the holder to drop it only after waiting a whole switch
interval (5 ms) without any release. An app loop that yields runs `epoll_wait` (a release)
thousands of times a second: each release wakes the waiting shipping thread and restarts its
5 ms wait, and the loop thread, already running, takes the GIL back before the woken thread is
scheduled. So the forced switch never comes and the shipping thread only runs when it wins that
race, which on an idle core it hardly ever does (`docs/benchmarks.md` section 7: seconds between
its turns). A loop that never yields is fine: it never releases, so the forced switch fires.

The app's own loop therefore hands the GIL over, on its next turn, when the shipping thread is
overdue: it schedules a callback on the shipping loop and blocks on a lock (the GIL released)
until the shipping loop is idle again or `_WAIT_S` has passed. That is one bounded pause of the
app's loop per `_INTERVAL_S` at most, and only while records wait longer than they should.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

__all__ = ["Handoff"]

# At most one handoff per this many seconds (the interpreter's own switch interval), doubled
# up to `_SLOW_INTERVAL_S` while the handoffs find the thread waiting for its sink: then what
# holds records back is the sink, not the GIL, and the handoffs would only cost the app.
_INTERVAL_S = 0.005
_SLOW_INTERVAL_S = 0.05
# A handoff scheduled on a loop that has not run it for this long (a loop that stopped, or one
# that stopped yielding) no longer holds back the next one, on another loop maybe.
_STALE_S = 1.0
# The longest the app's loop waits for the shipping loop to finish its turn.
_WAIT_S = 0.002


class Handoff:
    """The app side asks (`check`, from `submit`); the shipping side says when it is idle."""

    __slots__ = (
        "_batons",
        "_interval",
        "_next",
        "_scheduled_at",
        "_wake",
        "beat",
        "lent",
        "overdue",
    )

    def __init__(self, overdue: float, wake: Callable[[], bool]) -> None:
        self.overdue = overdue  # seconds without catching up that count as starved
        # On the shipping loop, when a handoff arrives: make it flush now; False if it is busy
        # with the sink (then the app loop waits one more turn of it, not for the sink).
        self._wake = wake
        # When the shipping loop last caught up (started waiting), or a wake-up was asked.
        self.beat = time.monotonic()
        self.lent = 0  # handoffs done (for the benchmark and tests)
        self._next = 0.0
        self._interval = _INTERVAL_S
        self._scheduled_at = 0.0  # when a handoff was scheduled that has not run yet (0: none)
        self._batons: list[threading.Lock] = []  # held by app loops waiting for our turn

    def check(self, shipping_loop: asyncio.AbstractEventLoop) -> None:
        """From `submit` (any thread): if the shipping thread is overdue and the caller runs
        on an event loop, lend it the GIL on that loop's next turn. Never blocks here."""
        now = time.monotonic()
        if now - self.beat < self.overdue or now < self._next:
            return
        if now - self._scheduled_at < _STALE_S:
            return  # one is scheduled already
        loop = asyncio._get_running_loop()
        if loop is None or loop is shipping_loop:
            return  # a plain thread blocks in its own I/O, which releases the GIL for long
        self._scheduled_at = now
        loop.call_soon(self._lend, shipping_loop)

    def _lend(self, shipping_loop: asyncio.AbstractEventLoop) -> None:
        """On the app's loop: wait, without the GIL, for the shipping loop's turn."""
        self._scheduled_at = 0.0
        now = time.monotonic()
        if now < self._next or now - self.beat < self.overdue:
            return  # another loop's handoff came first, or the thread caught up meanwhile
        self._next = now + self._interval
        baton = threading.Lock()
        baton.acquire()
        try:
            shipping_loop.call_soon_threadsafe(self._arrive, baton)
        except RuntimeError:  # the shipping loop is closed
            return
        self.lent += 1
        baton.acquire(timeout=_WAIT_S)

    def _arrive(self, baton: threading.Lock) -> None:
        """On the shipping loop: our turn came. Flush, and free the app loop once idle."""
        if self._wake():
            self._interval = _INTERVAL_S
            self._batons.append(baton)
        else:
            self._interval = min(2 * self._interval, _SLOW_INTERVAL_S)
            asyncio.get_running_loop().call_soon(_release, baton)

    def turn(self) -> None:
        """On the shipping loop, between two flushes: let the app loops that wait go on."""
        batons = self._batons
        if batons:
            self._batons = []
            for baton in batons:
                _release(baton)

    def idle(self) -> None:
        """On the shipping loop, before it waits (caught up, or backing off)."""
        self.beat = time.monotonic()
        self.turn()

    def reset(self) -> None:
        """In a forked child: no app loop waits for a thread the child does not have."""
        self._batons = []
        self._scheduled_at = 0.0
        self.beat = time.monotonic()


def _release(baton: threading.Lock) -> None:
    if baton.locked():
        baton.release()
