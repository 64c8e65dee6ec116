"""What a consumer reports about itself: counters, its last error, and its health (the value
of its heartbeat key, which ops tools and the tests read)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConsumerStatus"]

logger = logging.getLogger("vllm_middleware_worker")


@dataclass
class ConsumerStatus:
    """What the worker reports about itself (logs, health, tests)."""

    batches: int = 0
    records: int = 0
    bytes: int = 0
    dead_letters: int = 0
    write_failures: int = 0
    redis_failures: int = 0
    recovered_consumers: int = 0
    refused_intents: int = 0
    last_error: str | None = None
    last_batch_at: float | None = None
    errors_by_kind: Counter[str] = field(default_factory=Counter)

    def note_error(self, kind: str, exc: BaseException) -> None:
        """Count an error; log the first of each kind and every 100th (retries go on)."""
        self.errors_by_kind[kind] += 1
        self.last_error = f"{kind}: {type(exc).__name__}: {exc}"
        count = self.errors_by_kind[kind]
        if count == 1 or count % 100 == 0:
            logger.warning("%s failed (%d times so far): %s", kind, count, exc)

    def health(
        self,
        consumer: str,
        disk_error: str | None,
        ack_error: str | None,
        *,
        host: str,
        pid: int,
    ) -> dict[str, Any]:
        state = "disk_error" if disk_error else "ack_error" if ack_error else "ok"
        return {
            "consumer": consumer,
            "host": host,  # `vllm-mw health --host` filters on it
            "pid": pid,
            "batches": self.batches,
            "records": self.records,
            "dead_letters": self.dead_letters,
            "write_failures": self.write_failures,
            "redis_failures": self.redis_failures,
            "recovered_consumers": self.recovered_consumers,
            "refused_intents": self.refused_intents,
            "last_error": self.last_error,
            "last_batch_at": self.last_batch_at,
            "disk_error": disk_error,
            "ack_error": ack_error,
            "state": state,
        }
