"""The embedded writer process: the program on the other end of `ProcessWriter`'s pipes.

It appends the batches it is sent with a `PartitionWriter`, exactly as the writer thread did,
but in its own interpreter: a Python thread in the app's process has to win the GIL back
after each write and fsync, and behind a busy event loop it keeps waking and losing that race
(one futile context switch per loop turn). A process on the other core never competes.

Wire format, both ways: frames of a `_HEADER` (kind, body length, sequence number) and a body.

- app → writer: `BATCH` (sections of `_SECTION` + date + host + records joined by newlines),
  `CUT_BACK` (JSON `[[path, size], ...]`: the cuts a dead writer's intents call for).
- writer → app: `READY` once started; then per request `INTENT` (JSON `[[path, offset], ...]`,
  sent before the first byte is written: where the batch goes, so the app can have it cut back
  if this process dies before `DONE`), `DONE`, or `FAILED` (text; the batch was rolled back).
  The worker keeps the same intent in Redis (`vllm_middleware_worker._intent`).

The writer exits when its input reaches end of file: the app closed it, or the app died.
SIGINT and SIGTERM are ignored, so a Ctrl-C to the terminal's process group cannot kill the
writer in the middle of the app's final flush.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import orjson

from .._crash import crash_point
from .._modes import FileModes
from .._partition import PartitionLines, PartitionWriter, cut_back

__all__ = [
    "BATCH",
    "CUT_BACK",
    "DONE",
    "FAILED",
    "HEADER",
    "INTENT",
    "READY",
    "apply_cuts",
    "decode_batch",
    "encode_batch",
    "frame",
    "main",
]

HEADER = struct.Struct("<BIQ")  # kind, body length, sequence number
_SECTION = struct.Struct("<HHII")  # date length, host length, records, chunk length

# app → writer
BATCH = 1
CUT_BACK = 2
# writer → app
READY = 0
INTENT = 1
DONE = 2
FAILED = 3


def frame(kind: int, seq: int, body: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(body), seq) + body


def encode_batch(lines: PartitionLines) -> bytes:
    pieces: list[bytes] = []
    for (date, host), chunks in lines.chunks.items():
        raw_date, raw_host = date.encode(), host.encode("utf-8", "surrogatepass")
        chunk = chunks[0] if len(chunks) == 1 else b"\n".join(chunks)
        pieces += (
            _SECTION.pack(len(raw_date), len(raw_host), lines.records[(date, host)], len(chunk)),
            raw_date,
            raw_host,
            chunk,
        )
    return b"".join(pieces)


def decode_batch(body: bytes) -> PartitionLines:
    lines = PartitionLines()
    view = memoryview(body)
    pos, end = 0, len(body)
    while pos < end:
        date_len, host_len, records, chunk_len = _SECTION.unpack_from(view, pos)
        pos += _SECTION.size
        date = str(view[pos : pos + date_len], "ascii")
        pos += date_len
        host = str(view[pos : pos + host_len], "utf-8", "surrogatepass")
        pos += host_len
        lines.add(date, host, bytes(view[pos : pos + chunk_len]), records)
        pos += chunk_len
    if pos != end:
        raise ValueError("batch frame ends inside a section")
    return lines


def _frames(source: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """Frames until end of input; a frame cut short (the app died mid-send) ends it too."""
    while True:
        head = source.read(HEADER.size)
        if len(head) < HEADER.size:
            return
        kind, length, seq = HEADER.unpack(head)
        body = source.read(length)
        if len(body) < length:
            return
        yield kind, seq, body


def apply_cuts(cuts: list[list[object]]) -> None:
    """Cut files back to where a dead writer's unfinished batch started (see `cut_back`).

    A file the batch created (offset 0) is then removed rather than left empty: the writer that
    had it open is gone, and the cut is durable first, so a crash leaves at worst an empty file.
    """
    for path, offset in cuts:
        assert isinstance(path, str) and isinstance(offset, int)
        cut_back(path, offset)
        if offset == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


_FILE_IDLE_S = 300.0


def _serve(source: BinaryIO, reply_fd: int, writer: PartitionWriter, fault: str | None) -> None:
    def reply(kind: int, seq: int, body: bytes = b"") -> None:
        data = memoryview(frame(kind, seq, body))
        while data:
            data = data[os.write(reply_fd, data) :]

    # Test seams: "exit-after-write:N" dies between the Nth batch's write and its DONE;
    # "stall-after-write:S" sleeps S seconds between each write and its DONE (a slow fsync).
    fault_kind, _, fault_arg = (fault or "").partition(":")
    die_after = int(fault_arg) if fault_kind == "exit-after-write" else 0
    stall = float(fault_arg) if fault_kind == "stall-after-write" else 0.0
    batches = 0
    reply(READY, os.getpid())
    for kind, seq, body in _frames(source):
        try:
            if kind == BATCH:
                # As the worker does: a file idle this long is closed and never appended to
                # again, so compression and retention can take files that stay unchanged.
                writer.close_idle(_FILE_IDLE_S)
                plan = writer.plan(decode_batch(body))
                reply(INTENT, seq, orjson.dumps([[str(p.path), p.offset] for p in plan.parts]))
                crash_point("after-plan")
                writer.write(plan)
                if stall:
                    time.sleep(stall)
                batches += 1
                if batches == die_after:
                    os._exit(17)
            elif kind == CUT_BACK:
                apply_cuts(orjson.loads(body))
            else:
                raise ValueError(f"unknown request kind {kind}")
        except BrokenPipeError:
            return
        except Exception as exc:  # reported to the app, which retries or gives up
            reply(FAILED, seq, f"{type(exc).__name__}: {exc}".encode("utf-8", "replace"))
        else:
            reply(DONE, seq)


def main(argv: list[str]) -> int:
    """`argv`: request fd, reply fd, JSON settings (log_dir, owner, max_bytes, log_format,
    fsync and the optional test `fault`)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    request_fd, reply_fd = int(argv[0]), int(argv[1])
    settings = orjson.loads(argv[2])
    writer = PartitionWriter(
        settings["log_dir"],
        settings["owner"],
        max_bytes=settings["max_bytes"],
        log_format=settings["log_format"],
        fsync=settings["fsync"],
        modes=FileModes(*settings["modes"]),
    )
    with os.fdopen(request_fd, "rb", buffering=1 << 20) as source:
        try:
            _serve(source, reply_fd, writer, settings.get("fault"))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                os.close(reply_fd)
    return 0


if __name__ == "__main__":  # pragma: no cover - started through ProcessWriter's bootstrap
    sys.exit(main(sys.argv[1:]))
