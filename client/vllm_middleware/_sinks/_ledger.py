"""How many records a shipper accepted and how many of them left memory, and who waits for that.

`durable=True` callers and `settle` wait until every record submitted before them has left
memory (shipped, kept by the backlog, or dropped and counted). Batches leave in order, so two
counters are enough: a waiter's target is the number accepted when it asked. `accepted` is
written by the request path only (under the shipper's submit lock), the rest by the shipping
loop only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable

__all__ = ["Ledger"]


class Ledger:
    """`flush_now` (called on the shipping loop) makes the shipper flush at once rather than at
    its next timer, for a waiter."""

    def __init__(self, flush_now: Callable[[], None]) -> None:
        self.accepted = 0
        self.resolved = 0
        self._flush_now = flush_now
        self._waiters: list[tuple[int, concurrent.futures.Future[None]]] = []

    @property
    def owed(self) -> bool:
        """Some accepted record has not left memory yet."""
        return self.accepted > self.resolved

    async def wait(
        self, loop: asyncio.AbstractEventLoop | None, timeout: float | None = None
    ) -> bool:
        """From any event loop: wait until every record accepted so far is resolved, on the
        shipping `loop` (None: not started, or closed before a fork). False on timeout."""
        target = self.accepted
        if self.resolved >= target or loop is None:
            return self.resolved >= target
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            loop.call_soon_threadsafe(self._add, target, future)
        except RuntimeError:  # the shipping loop is closed: everything was resolved
            return self.resolved >= target
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(future), timeout)
            return True
        return False

    def flush_soon(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """From any thread: have what is owed shipped now rather than at the next timer."""
        if loop is not None and self.owed:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing to flush
                loop.call_soon_threadsafe(self._add, self.accepted, concurrent.futures.Future())

    def _add(self, target: int, future: concurrent.futures.Future[None]) -> None:
        """On the shipping loop: end `future` once `target` records are resolved."""
        if self.resolved >= target:
            settle(future)
            return
        self._waiters.append((target, future))
        self._flush_now()

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def resolve(self, count: int) -> None:
        """`count` more records left memory, in order."""
        self.resolved += count
        if not self._waiters:
            return
        done = self.resolved
        keep = []
        for target, future in self._waiters:
            if target <= done:
                settle(future)
            else:
                keep.append((target, future))
        self._waiters = keep

    def after_fork_in_child(self) -> None:
        """The records accepted before the fork are the parent's to ship: none is owed here,
        and the parent's waiters are not ours."""
        self._waiters = []
        self.resolved = self.accepted


def settle(future: concurrent.futures.Future[None]) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled by its waiter
        future.set_result(None)
