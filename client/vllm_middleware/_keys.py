"""Names shared by the client, the worker and the ops tools: Redis keys and stream entry fields."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ENTRY_FIELDS", "StreamKeys"]

# Stream entry fields: the partition keys travel beside the encoded record so that the worker
# routes bytes without parsing them.
FIELD_DATE = b"date"
FIELD_HOST = b"host"
FIELD_ERROR = b"err"
FIELD_RECORD = b"rec"
ENTRY_FIELDS = (FIELD_DATE, FIELD_HOST, FIELD_ERROR, FIELD_RECORD)


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

    def batch_marker(self, batch_id: str) -> str:
        return f"{self.stream}:batch:{batch_id}"

    def heartbeat(self, consumer: str) -> str:
        return f"{self.stream}:alive:{consumer}"
