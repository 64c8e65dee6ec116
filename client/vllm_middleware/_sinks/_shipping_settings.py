"""The settings of a `Shipper` (how records wait between the request path and a sink), the
counters it keeps, and the `Tally` of counts that still owe the fleet's statistics."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["NO_COUNTS", "BufferCounters", "ShippingSettings", "Tally", "Unreported"]

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
    high_water: int = 0  # most records held in memory at once (seen when a batch is taken)
    sampled_out: int = 0  # calls left out by `sample_rate` (`Shipper.count_sampled_out`)


class Unreported(NamedTuple):
    """Counts not yet in the fleet's statistics (the Redis stats hash)."""

    dropped: int
    sampled_out: int


NO_COUNTS = Unreported(0, 0)


class Tally:
    """A shipper's counters, shared with its sinks, and the drops and sampled-out calls the
    fleet's statistics have not been told about yet (they travel with the next batch).

    Safe from any thread. Reentrant: a client's finalizer may count in any thread, inside any
    allocation.
    """

    def __init__(self) -> None:
        self.counters = BufferCounters()
        self._lock = threading.RLock()
        self._dropped = 0
        self._sampled_out = 0

    def count_dropped(self, count: int, why: str) -> None:
        """Records given up on purpose: counted, reported to Redis later, and logged."""
        counters = self.counters
        with self._lock:
            before = counters.dropped
            counters.dropped += count
            self._dropped += count
            after = counters.dropped
        if before == 0 or before // 10_000 != after // 10_000:
            logger.warning("%s: %d log records dropped so far", why, after)

    def count_sampled_out(self, count: int) -> None:
        with self._lock:
            self.counters.sampled_out += count
            self._sampled_out += count

    @property
    def owed(self) -> bool:
        """Counts wait to be reported (read without the lock: a hint for the shipping loop)."""
        return bool(self._dropped or self._sampled_out)

    def take(self) -> Unreported:
        """The counts to report now; the caller gives them back if it cannot."""
        with self._lock:
            taken = Unreported(self._dropped, self._sampled_out)
            self._dropped = self._sampled_out = 0
        return taken

    def give_back(self, counts: Unreported) -> None:
        with self._lock:
            self._dropped += counts.dropped
            self._sampled_out += counts.sampled_out

    def after_fork_in_child(self) -> None:
        # The lock may have been held by a thread the child does not have.
        self._lock = threading.RLock()
