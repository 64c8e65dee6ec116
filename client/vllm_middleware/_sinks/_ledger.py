"""How many records a shipper accepted and how many of them left memory, and who waits for that.

`durable=True` callers and `settle` wait until every record submitted before them has left
memory (shipped, kept by the backlog, or dropped and counted). Batches leave in order, so two
counters are enough: a waiter's target is the number accepted when it asked. `accepted` is
written by the request path only (under the shipper's submit lock), the rest by the shipping
loop only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib

__all__ = ["Ledger"]


class Ledger:
    def __init__(self) -> None:
        self.accepted = 0
        self.resolved = 0
        self._waiters: list[tuple[int, concurrent.futures.Future[None]]] = []

    @property
    def owed(self) -> bool:
        """Some accepted record has not left memory yet."""
        return self.accepted > self.resolved

    def wait(self, target: int, future: concurrent.futures.Future[None]) -> bool:
        """On the shipping loop: end `future` once `target` records are resolved. True if it
        has to wait (the caller then flushes at once rather than at the next timer)."""
        if self.resolved >= target:
            settle(future)
            return False
        self._waiters.append((target, future))
        return True

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
