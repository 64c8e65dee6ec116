"""Who waits for records to leave memory (`durable=True` calls, `settle`, `flush_soon`).

Batches leave a shipper's buffer in order, so one counter pair says what left: `accepted`
records so far (written by the request path only) and how many of them were `resolved`
(shipped, spooled or dropped: written by the shipping loop only). A waiter wants `resolved`
to reach the `accepted` of the moment it asked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable

__all__ = ["DurableWaiters"]


class DurableWaiters:
    """The counters and the futures waiting on them; `add` and `resolve` run on the shipping
    loop, `accepted` is counted under the shipper's submit lock. `flush_now`, on the shipping
    loop: a waiter arrived, ship what is buffered without waiting for the timer."""

    __slots__ = ("accepted", "flush_now", "resolved", "waiters")

    def __init__(self, flush_now: Callable[[], None]) -> None:
        self.flush_now = flush_now
        self.accepted = 0
        self.resolved = 0
        self.waiters: list[tuple[int, concurrent.futures.Future[None]]] = []

    @property
    def caught_up(self) -> bool:
        return self.resolved >= self.accepted

    async def wait(self, loop: asyncio.AbstractEventLoop | None, timeout: float | None) -> bool:
        """From any event loop: until the records accepted so far are resolved (False on
        timeout); `loop` is the shipping loop (None: closed before a fork, in the parent)."""
        target = self.accepted
        if self.resolved >= target:
            return True
        if loop is None:
            return self.resolved >= target
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            loop.call_soon_threadsafe(self.add, target, future)
        except RuntimeError:  # the shipping loop is closed: everything was resolved
            return self.resolved >= target
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(future), timeout)
            return True
        return False

    def flush_soon(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """From any thread: have the shipping loop ship what is buffered now."""
        if loop is not None and not self.caught_up:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing to flush
                loop.call_soon_threadsafe(self.add, self.accepted, concurrent.futures.Future())

    def add(self, target: int, future: concurrent.futures.Future[None]) -> None:
        """On the shipping loop: settle `future` once `target` records are resolved."""
        if self.resolved >= target:
            settle(future)
            return
        self.waiters.append((target, future))
        self.flush_now()

    def resolve(self, count: int) -> None:
        self.resolved += count
        if not self.waiters:
            return
        done = self.resolved
        keep = []
        for target, future in self.waiters:
            if target <= done:
                settle(future)
            else:
                keep.append((target, future))
        self.waiters = keep

    def after_fork_in_child(self) -> None:
        """What the parent had accepted is the parent's to ship: nothing to wait for here."""
        self.waiters = []
        self.resolved = self.accepted


def settle(future: concurrent.futures.Future[None]) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by its waiter
        future.set_result(None)
