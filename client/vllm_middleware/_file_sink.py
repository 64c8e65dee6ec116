"""The embedded sink: the client writes the partitioned files itself, in one background thread."""

from __future__ import annotations

import asyncio
import os
import socket
from concurrent.futures import ThreadPoolExecutor

from ._partition import LogFormat, PartitionWriter
from ._record import RecordEntry
from ._shipping import Shipper, ShippingSettings

__all__ = ["FileSink"]


class FileSink(Shipper):
    """Writes batches with a `PartitionWriter` on a dedicated thread, so the loop never waits.

    One thread keeps writes to this process's files strictly ordered and lets close wait for a
    write that is still running.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        max_bytes: int,
        log_format: LogFormat = "jsonl",
        fsync: bool = True,
        shipping: ShippingSettings | None = None,
    ) -> None:
        super().__init__(shipping)
        owner = f"embedded-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.writer = PartitionWriter(
            log_dir, owner, max_bytes=max_bytes, log_format=log_format, fsync=fsync
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-mw-writer")

    async def ship(self, batch: list[RecordEntry], *, dropped: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.writer.write_batch, batch)

    async def close_sink(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.writer.close)
        self._executor.shutdown(wait=True)
