"""What a `Shipper` needs of the place its batches go.

Every sink ships a batch (durably, or raises) and closes. A sink that keeps records of its own
between batches (the spool, `SpoolingSink`) also offers the `Backlog` capability: the shipper
drives it between live batches and hands it the batches the destination did not take.

Sinks are used from the shipping loop only (one task at a time, except `report_counts`, which
`settle` may call while a batch is out); none of their methods is safe from another thread.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._record import RecordEntry
from ._shipping_settings import NO_COUNTS, Unreported

__all__ = ["Backlog", "Sink", "keep_all"]


class Sink(Protocol):
    @property
    def healthy(self) -> bool | None:
        """Whether the destination answers now (None: the sink does not track it)."""

    async def ship(self, batch: list[RecordEntry], *, dropped: int, sampled_out: int) -> None:
        """Make `batch` durable at the destination, or raise (the shipper keeps it and
        retries). `dropped`, `sampled_out`: records dropped and calls sampled out since the
        last report, for the fleet's statistics (a sink without them ignores them)."""

    async def report_counts(self, dropped: int, sampled_out: int) -> None:
        """Counts to report with no batch to carry them: the sink owes them from then on
        (zeros when there are none: a sink that still owes some tries to send them). Raises
        when it could not send them now; they stay owed."""

    async def aclose(self) -> None:
        """Release what the sink created (not what was injected)."""


@runtime_checkable
class Backlog(Protocol):
    """A sink that holds records of its own (a spool) and sends them when it can."""

    def take_limit(self, batch_size: int) -> int:
        """Records the shipper should take off its buffer for the next `ship`."""

    def has_backlog(self) -> bool:
        """True while there are older records the sink can send now."""

    def quiet_for(self) -> float | None:
        """With nothing to ship: the seconds the shipper may sleep before the backlog wants a
        turn (None: a turn every `flush_interval`, e.g. while there is one to send or the
        destination is away)."""

    async def work_backlog(self) -> None:
        """Send a little of the backlog; called between live batches, never raises."""

    async def keep(self, batch: list[RecordEntry], counts: Unreported) -> bool:
        """Take `batch` into the backlog: after `ship` failed on it, and at close for what
        could not be shipped in time. True when it is there (or was dropped and counted),
        and the sink then owns `counts`, the counts `ship` was given with it (a failed flush
        may have landed, counts included); False leaves both to the shipper (retried, or
        counted as dropped at close)."""

    async def recheck(self, timeout: float) -> float:
        """At close (and `settle`), before the last flush: ask the destination once more
        whether it is back, so the backlog can go out in the time left. Returns what is left
        of `timeout`."""


async def keep_all(
    backlog: Backlog | None,
    inflight: list[RecordEntry],
    counts: Unreported,
    pending: list[RecordEntry],
) -> int:
    """Keep what a closing shipper could not ship in time in `backlog` (if any): the in-flight
    batch first, whole, with its counts (the sink may know it under an id: a flush that may
    have landed), then the rest. Returns how many records were kept."""
    if backlog is None:
        return 0
    saved = 0
    if inflight:
        if not await backlog.keep(inflight, counts):
            return 0
        saved += len(inflight)
    if pending and await backlog.keep(pending, NO_COUNTS):
        saved += len(pending)
    return saved
