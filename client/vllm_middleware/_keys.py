"""Names shared by the client, the worker and the ops tools: Redis keys and stream entry fields."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["BUNDLE_BYTES", "BUNDLE_RECORDS", "ENTRY_FIELDS", "StreamKeys", "bundle_sum"]

# Stream entry fields, in this order: the partition keys travel beside the encoded records so
# that the worker routes bytes without parsing them. An entry is a bundle: `rec` holds `n`
# records of one (date, host) joined by newlines, `err` how many of them are errors. Redis's
# cost is per entry (reply framing, pending-list node, XDEL), so a busy client's flush of 60
# records costs Redis and the worker about as much as one record did. Entries without `n`
# (written before bundles) hold one record, `err` then being "0" or "1".
# `sum` is `bundle_sum(rec)`, computed by this client's packing over what orjson encoded: the
# worker writes a bundle whose sum matches as it is, and parses every record of any other entry
# (older clients, other producers, damaged bundles), so that each line of the files is one JSON
# object in valid UTF-8. A checksum tells our bytes from anyone else's mistakes; it is not a
# signature (anyone who can XADD can compute one).
FIELD_DATE = b"date"
FIELD_HOST = b"host"
FIELD_ERROR = b"err"
FIELD_COUNT = b"n"
FIELD_SUM = b"sum"
FIELD_RECORD = b"rec"
ENTRY_FIELDS = (FIELD_DATE, FIELD_HOST, FIELD_ERROR, FIELD_COUNT, FIELD_SUM, FIELD_RECORD)
# A bundle ends at whichever comes first (a larger record travels alone). Small enough that a
# worker's read of bundles stays bounded; large enough that per-entry costs disappear.
BUNDLE_RECORDS = 100
BUNDLE_BYTES = 64 * 1024


def bundle_sum(data: bytes) -> int:
    """The `sum` field of a bundle: CRC-32 of its bytes (memory speed, releases the GIL)."""
    return zlib.crc32(data)


@dataclass(frozen=True)
class StreamKeys:
    """All Redis keys of one pipeline, derived from the stream name (default `vllm:logs`)."""

    stream: str = "vllm:logs"

    @property
    def group(self) -> str:
        return "vllm-mw-writers"

    @property
    def stats(self) -> str:
        return f"{self.stream}:stats"

    @property
    def dead_letter(self) -> str:
        return f"{self.stream}:dead"

    @property
    def inflight(self) -> str:
        return f"{self.stream}:inflight"

    @property
    def refused(self) -> str:
        """Intents a worker refused to act on (consumer -> reason), left for a person."""
        return f"{self.stream}:refused"

    def batch_marker(self, batch_id: str) -> str:
        return f"{self.stream}:batch:{batch_id}"

    def heartbeat(self, consumer: str) -> str:
        return f"{self.stream}:alive:{consumer}"
