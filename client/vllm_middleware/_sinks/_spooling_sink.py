"""The Redis sink wrapped with a local spool for outages.

When a flush fails (Redis unreachable, hung past `redis_timeout`, out of memory, restarting),
the batch is written to the spool (`_spool.py`) under its batch id, and this sink stops trying
Redis for live batches: they go straight to the spool, so the buffer drains at disk speed and
memory stays flat. A background probe PINGs Redis with backoff; once it answers, live batches
go to Redis again and, between them, the spool is replayed oldest first, one batch per live
batch (interleaved: the stream is not ordered across processes or workers anyway). A replayed
batch first checks its marker (`RedisStreamSink.delivered`), so a batch whose original flush
did land is not sent twice. Markers live `MARKER_TTL_S`; a spool older than that replays
without that check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .._exit import run_blocking
from .._partition import sanitize_partition_value
from .._record import RecordEntry
from ._redis_sink import BatchAttempt, RedisStreamSink
from ._shipping_settings import NO_COUNTS, ShippingSettings, Tally, Unreported
from ._spool import Spool, SpoolGroup

__all__ = ["RedisUnavailable", "SpoolingSink", "default_spool_root"]

logger = logging.getLogger("vllm_middleware")

_ADOPT_INTERVAL_S = 10.0
_SPOOL_BATCHES = 8  # batches per spool write while Redis is away
# Records per spooled batch id (one replay transaction). Packing costs ~0.5 µs a record on
# the event loop, so 500 hold it ~0.3 ms; fewer, smaller groups made the replay crawl under
# load, each group costing two hops to the spool's thread (GIL waits behind a busy loop).
_REPLAY_CHUNK = 500
_MB = 1024 * 1024
_T = TypeVar("_T")


class RedisUnavailable(ConnectionError):
    """Raised instead of trying a Redis that just failed; the batch goes to the spool."""


def default_spool_root() -> Path:
    return Path.home() / ".cache" / "vllm-middleware" / "spool"


class SpoolingSink:
    """A `RedisStreamSink` with a `Backlog`: the spool, its replay and the health probe.

    `tally`: the shipper's, where spooled, replayed and dropped records are counted.
    """

    def __init__(
        self, redis_sink: RedisStreamSink, settings: ShippingSettings, tally: Tally
    ) -> None:
        self.redis_sink = redis_sink
        self.settings = settings
        self.tally = tally
        self.counters = tally.counters
        self.healthy = True  # False from a failed flush until the probe's PING answers
        self.spool: Spool | None = None  # opened at the first batch to spool (or replay)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-mw-spool")
        self._spool_retry_at = 0.0
        self._next_adopt = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._probe_backoff = settings.retry_backoff[0]
        self._spool_errors = 0
        self._outages = 0
        self._replay_retry_at = 0.0
        self._reported_damage = 0  # damaged spool regions already counted in Redis
        # Counts a spooled batch carried in a flush that failed but may have landed: they
        # go with its replay, unless its marker says that flush landed (counts included).
        self._in_doubt: dict[str, Unreported] = {}

    # -- Sink ---------------------------------------------------------------------------------
    async def ship(self, batch: list[RecordEntry], *, dropped: int, sampled_out: int) -> None:
        if not self.healthy:
            raise RedisUnavailable("Redis did not answer; spooling until it does")
        try:
            await self.redis_sink.ship(batch, dropped=dropped, sampled_out=sampled_out)
        except Exception as exc:  # the shipper hands the batch to `keep`
            self._mark_unhealthy(f"{type(exc).__name__}: {exc}")
            raise
        self._probe_backoff = self.settings.retry_backoff[0]

    async def report_counts(self, dropped: int, sampled_out: int) -> None:
        if self.healthy:
            await self.redis_sink.report_counts(dropped, sampled_out)
        else:  # sent once Redis answers again
            self.redis_sink.owe(dropped, sampled_out)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self.spool is not None:
            spool, self.spool = self.spool, None
            with contextlib.suppress(OSError):
                await self._run_io(spool.close)
        self._io.shutdown(wait=False)
        await self.redis_sink.aclose()

    # -- Backlog ------------------------------------------------------------------------------
    def take_limit(self, batch_size: int) -> int:
        # While Redis is away, batches go to the spool: take more at once, so one write and
        # one fsync carry many batches and the buffer drains faster than apps fill it.
        return batch_size if self.healthy else batch_size * _SPOOL_BATCHES

    def has_backlog(self) -> bool:
        if not self.healthy or self.spool is None or time.monotonic() < self._replay_retry_at:
            return False
        return bool(self.spool)

    def quiet_for(self) -> float | None:
        if not self.healthy or (self.spool is not None and self.spool):
            return None  # the probe or the replay needs the shipper's turns
        wait = self._next_adopt - time.monotonic()  # the next look for other processes' spools
        return wait if wait > self.settings.flush_interval else None

    async def work_backlog(self) -> None:
        try:
            await self._replay_one()
        except Exception as exc:  # the replay must never stop the flush task
            self._spool_failed("log spool replay failed", exc)
            # An unreadable spool: pause the replay instead of spinning on it.
            self._replay_retry_at = time.monotonic() + self.settings.retry_backoff[1]

    async def keep(self, batch: list[RecordEntry], counts: Unreported) -> bool:
        """Spool `batch`. The in-flight batch keeps its id (its flush may have landed: the
        marker then skips exactly it on replay, and the counts that flush carried)."""
        attempt = self.redis_sink.current_batch()
        if not await self._spool_batch(attempt, batch):
            return False
        self.redis_sink.forget_batch()
        carried = attempt.carried if attempt.attempted else NO_COUNTS
        doubt = Unreported(
            min(carried.dropped, counts.dropped), min(carried.sampled_out, counts.sampled_out)
        )
        if doubt != NO_COUNTS:
            self._in_doubt[attempt.batch_id] = doubt
        # The rest was never sent: owed, sent once Redis answers.
        self.redis_sink.owe(counts.dropped - doubt.dropped, counts.sampled_out - doubt.sampled_out)
        return True

    async def recheck(self, timeout: float) -> float:
        """With a spool to replay, ask Redis once more whether it is back (the probe may be
        sleeping a long backoff), so close can replay it in its budget."""
        if not self.healthy and self.spool is not None and self.spool:
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await self.redis_sink.ping(min(self.redis_sink.timeout, timeout / 4))
                self.healthy = True
            timeout = max(0.0, timeout - (time.monotonic() - started))
        return timeout

    # -- the spool ----------------------------------------------------------------------------
    def spool_directory(self) -> Path:
        """`<root>/<stream>-<hash of the Redis address>`: never replay into another Redis."""
        root = Path(self.settings.spool_dir) if self.settings.spool_dir else default_spool_root()
        digest = hashlib.sha256(self.redis_sink.address.encode()).hexdigest()[:10]
        return root / f"{sanitize_partition_value(self.redis_sink.keys.stream)}-{digest}"

    async def _run_io(self, func: Callable[..., _T], *args: Any) -> _T:
        return await run_blocking(self._io, func, *args)

    async def open_spool(self) -> Spool | None:
        """The spool, opened if need be; None when it cannot be opened now."""
        if self.spool is not None:
            return self.spool
        if time.monotonic() < self._spool_retry_at:
            return None
        directory = self.spool_directory()
        max_bytes = int(self.settings.spool_max_mb * _MB)
        fsync = self.settings.spool_fsync
        try:
            self.spool = await self._run_io(
                lambda: Spool(directory, max_bytes=max_bytes, fsync=fsync)
            )
        except OSError as exc:
            self._spool_retry_at = time.monotonic() + 10
            self._spool_failed(f"cannot open the log spool {directory}", exc)
        return self.spool

    async def _spool_batch(self, attempt: BatchAttempt, batch: list[RecordEntry]) -> bool:
        """True when the batch is durable in the spool or dropped and counted (spool full)."""
        spool = await self.open_spool()
        if spool is None:
            return False
        # A batch whose live flush was attempted stays whole under its id (its marker may
        # exist). Anything else is cut into small batches: each replays as one transaction
        # whose packing runs on the event loop, so small ones keep the request path smooth.
        size = len(batch) if attempt.attempted else min(self.settings.batch_size, _REPLAY_CHUNK)
        new_id = self.redis_sink.new_batch_id
        chunks = [(attempt.batch_id, batch[:size])]
        chunks += [(new_id(), batch[i : i + size]) for i in range(size, len(batch), size)]
        try:
            written = await self._run_io(spool.append_many, chunks)
        except OSError as exc:
            self._spool_failed("cannot write the log spool (records kept in memory)", exc)
            return False
        except Exception as exc:  # a record that cannot be framed (a 64 KiB host name)
            self._spool_failed("cannot frame records for the log spool", exc)
            self.tally.count_dropped(len(batch), "records not spoolable")
            return True
        if written:
            self.counters.spooled += len(batch)
        else:
            why = f"log spool full ({self.settings.spool_max_mb:g} MB)"
            self.tally.count_dropped(len(batch), why)
        self.counters.spool_bytes = spool.nbytes
        return True

    def _spool_failed(self, what: str, exc: BaseException) -> None:
        self._spool_errors += 1
        self.counters.last_error = f"{what}: {exc}"
        if self._spool_errors == 1 or self._spool_errors % 100 == 0:
            logger.warning("%s: %s", what, exc)

    async def _replay_one(self) -> None:
        if not self.healthy:
            return
        if self.spool is None or time.monotonic() >= self._next_adopt:
            self._next_adopt = time.monotonic() + _ADOPT_INTERVAL_S
            spool = await self.open_spool()
            if spool is None:
                return
            adopted = await self._run_io(spool.adopt_orphans)
            if adopted:
                logger.warning("adopted %d log spool segments left by other processes", adopted)
        spool = self.spool
        if spool is None or not spool:
            return
        group = await self._run_io(spool.next_group)
        self.counters.spool_damaged = spool.damaged_regions
        if group is None:
            return
        try:
            await asyncio.wait_for(self._send_replay(group), self.redis_sink.timeout)
        except Exception as exc:
            self.counters.last_error = f"replay: {type(exc).__name__}: {exc}"
            self._mark_unhealthy(self.counters.last_error)
            return
        await self._run_io(spool.commit, group)
        self.counters.replayed += len(group.entries)
        self.counters.spool_bytes = spool.nbytes
        self._probe_backoff = self.settings.retry_backoff[0]

    async def _send_replay(self, group: SpoolGroup) -> None:
        batch_ids = [group.batch_id]
        if not group.complete:
            # Part of a batch (damage cut it): its own marker, but skip it if the whole batch
            # was delivered by the original flush.
            batch_ids.append(f"{group.batch_id}.{group.first_index}")
        if await self.redis_sink.delivered(*batch_ids):
            self._in_doubt.pop(group.batch_id, None)  # landed with that flush
            return
        damaged = self.counters.spool_damaged - self._reported_damage
        counts = self._in_doubt.get(group.batch_id, NO_COUNTS)
        await self.redis_sink.send(group.entries, batch_ids[-1], damaged=damaged, counts=counts)
        self._reported_damage += damaged
        self._in_doubt.pop(group.batch_id, None)

    # -- health -------------------------------------------------------------------------------
    def _mark_unhealthy(self, error: str) -> None:
        if self.healthy:
            self._outages += 1
            if self._outages == 1 or self._outages % 100 == 0:
                logger.warning(
                    "Redis did not take a log batch (%s): spooling to %s until it answers",
                    error,
                    self.spool_directory(),
                )
        self.healthy = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_loop(), name="vllm-mw-redis-probe"
            )

    async def _probe_loop(self) -> None:
        """PING with backoff until Redis answers; live flushes stay on the spool meanwhile."""
        backoff_max = self.settings.retry_backoff[1]
        while not self.healthy:
            await asyncio.sleep(self._probe_backoff)
            self._probe_backoff = min(self._probe_backoff * 2, backoff_max)
            try:
                await self.redis_sink.ping()
            except Exception:  # still down: keep probing
                continue
            self.healthy = True
