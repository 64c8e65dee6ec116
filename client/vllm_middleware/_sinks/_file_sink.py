"""The embedded sink: the client writes the partitioned files itself, off the event loop.

The files are written by a writer process beside the app (`ProcessWriter`) where one can be
started, else by one thread in the app. The process is preferred because a writer thread
needs the GIL after every write and fsync, and behind a busy event loop it wakes and loses
that race once per loop turn: about one context switch per request, charged to the app.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from .._exceptions import ConfigurationError
from .._exit import run_blocking
from .._modes import LOG_MODES, FileModes
from .._partition import LogFormat, PartitionWriter
from .._record import RecordEntry
from ._process_writer import ProcessWriter, WriterProcessUnavailable

__all__ = ["FileSink"]

logger = logging.getLogger("vllm_middleware")

_WRITERS = ("auto", "process", "thread")


class FileSink:
    """Writes batches with a writer process or a dedicated thread, so the loop never waits.

    Either way one writer keeps this sink's writes strictly ordered, and close waits for a
    write that is still running. Drops and sampled-out calls stay in this process's counters:
    there is no fleet to tell.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        max_bytes: int,
        log_format: LogFormat = "jsonl",
        fsync: bool = True,
        writer: str = "auto",
        modes: FileModes = LOG_MODES,
    ) -> None:
        kind = writer
        if kind not in _WRITERS:
            raise ConfigurationError(
                f"embedded_writer (VLLM_MW_EMBEDDED_WRITER) must be one of {_WRITERS}, not {kind!r}"
            )
        owner = f"embedded-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.writer = PartitionWriter(
            log_dir, owner, max_bytes=max_bytes, log_format=log_format, fsync=fsync, modes=modes
        )
        self.process: ProcessWriter | None = None
        if kind == "process" or (kind == "auto" and sys.platform != "win32"):
            self.process = ProcessWriter(
                log_dir, owner, max_bytes=max_bytes, log_format=log_format, fsync=fsync, modes=modes
            )
        self._executor: ThreadPoolExecutor | None = None
        self._may_fall_back = kind == "auto"

    async def ship(self, batch: list[RecordEntry], *, dropped: int, sampled_out: int) -> None:
        process = self.process
        if process is not None:
            try:
                await process.write(batch)
                return
            except WriterProcessUnavailable as exc:
                if not self._may_fall_back or process.starts:
                    raise
                logger.warning("embedded log writer: %s; writing from a thread instead", exc)
                self.process = None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-mw-writer")
        await run_blocking(self._executor, self.writer.write_batch, batch)

    @property
    def healthy(self) -> bool | None:
        return None

    async def report_counts(self, dropped: int, sampled_out: int) -> None:
        return None

    async def aclose(self) -> None:
        if self.process is not None:
            await self.process.aclose()
        if self._executor is not None:
            await run_blocking(self._executor, self.writer.close)
            self._executor.shutdown(wait=True)
