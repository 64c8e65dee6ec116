"""The app's side of the embedded writer process (`_writer_main`): start it, feed it, watch it.

Everything here runs on the event loop and never blocks it: batches go down a non-blocking
pipe (the loop waits for room with `add_writer`), replies come back through `add_reader`.

If the writer dies, the batch it was writing fails with `WriterProcessError` and the shipper
retries it; the next batch starts a new writer, which first cuts back whatever the dead one
had written of unfinished batches (the `INTENT` it sent before writing says where), so the retry
neither duplicates nor tears a line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence

import orjson

from .._modes import LOG_MODES, FileModes
from .._partition import PartitionLines
from .._record import RecordEntry
from ._writer_main import (
    BATCH,
    CUT_BACK,
    DONE,
    FAILED,
    HEADER,
    INTENT,
    READY,
    apply_cuts,
    encode_batch,
    frame,
)

__all__ = ["ProcessWriter", "WriterProcessError", "WriterProcessUnavailable"]

# Starts the writer without running the package's __init__, which imports the whole client
# (httpx, redis, pydantic): ~0.3 s and ~35 MB for a process that needs only the file writer.
_BOOTSTRAP = (
    "import sys, types\n"
    "package = types.ModuleType('vllm_middleware')\n"
    "package.__path__ = [sys.argv[1]]\n"
    "sys.modules['vllm_middleware'] = package\n"
    "from vllm_middleware._sinks._writer_main import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PIPE_BYTES = 1 << 20  # room for a whole batch of 1 KB records without waiting for the writer
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in the fcntl module only on Linux


_INSTANCES: weakref.WeakSet[ProcessWriter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for writer in list(_INSTANCES):
        writer._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _widen(fd: int) -> None:
    """Ask for a larger pipe (Linux; the default 64 KiB holds ~60 records)."""
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # close_send may have failed it since this callback was queued
        future.set_result(None)


class WriterProcessError(OSError):
    """The writer process failed a batch, or died while writing it."""


class WriterProcessUnavailable(WriterProcessError):
    """The writer process could not be started."""


class _Spawned:
    """One spawned writer process and its two pipe ends, from start to exit."""

    def __init__(self, proc: subprocess.Popen[bytes], send_fd: int, recv_fd: int) -> None:
        loop = asyncio.get_running_loop()
        self.proc = proc
        self.send_fd = send_fd
        self.recv_fd = recv_fd
        self.buffer = bytearray()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.waiting: dict[int, asyncio.Future[None]] = {}
        self.intents: dict[int, list[list[object]]] = {}  # INTENT received, DONE/FAILED not yet
        self.room: asyncio.Future[None] | None = None  # a send waiting for room in the pipe

    @property
    def alive(self) -> bool:
        return not self.exited.done() and self.send_fd >= 0

    def close_send(self) -> None:
        if self.send_fd < 0:
            return
        fd, self.send_fd = self.send_fd, -1
        room, self.room = self.room, None
        if room is not None:
            # Unregistered before the close: the selector must not keep a closed fd.
            asyncio.get_running_loop().remove_writer(fd)
            if not room.done():
                room.set_exception(WriterProcessError("the writer process exited"))
                room.exception()  # retrieved, as for the waiters in `_lost`
        with contextlib.suppress(OSError):
            os.close(fd)

    def close_fds(self) -> None:
        """Close both pipe ends without the event loop (after a fork, or when collected)."""
        for name in ("send_fd", "recv_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __del__(self) -> None:
        # A client dropped without close, its loop gone: closing our ends is the writer's
        # end of input, so it finishes and exits instead of living as long as the app.
        self.close_fds()


class ProcessWriter:
    """Appends batches through a writer process; one per `FileSink`, started on first use."""

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        owner: str,
        *,
        max_bytes: int,
        log_format: str,
        fsync: bool,
        start_timeout: float = 10.0,
        modes: FileModes = LOG_MODES,
    ) -> None:
        self.settings: dict[str, object] = {
            # Absolute: the process starts at the first flush, in the cwd of that moment.
            "log_dir": os.path.abspath(log_dir),
            "owner": owner,
            "max_bytes": max_bytes,
            "log_format": log_format,
            "fsync": fsync,
            "modes": list(modes),
        }
        self.start_timeout = start_timeout
        self.close_timeout = 10.0  # how long close waits for the writer to finish and exit
        self.starts = 0  # writers started so far (restarts after a death included)
        self.fault: str | None = None  # test seam: passed to the next writer started
        self._spawned: _Spawned | None = None
        self._cuts: list[list[object]] = []  # parts a dead writer may have left half written
        self._seq = 0
        _INSTANCES.add(self)

    @property
    def pid(self) -> int | None:
        return self._spawned.proc.pid if self._spawned is not None and self._spawned.alive else None

    async def write(self, batch: Sequence[RecordEntry]) -> None:
        """Append `batch` durably, or raise `WriterProcessError` (nothing of it is kept)."""
        spawned = await self._running()
        self._seq += 1
        seq = self._seq
        done = asyncio.get_running_loop().create_future()
        spawned.waiting[seq] = done
        try:
            body = encode_batch(PartitionLines.from_entries(batch))
            await self._send(spawned, frame(BATCH, seq, body))
            await done
        finally:
            spawned.waiting.pop(seq, None)

    async def aclose(self, timeout: float | None = None) -> None:
        """Let the writer finish what it was sent, then wait (bounded) for it to exit."""
        spawned, self._spawned = self._spawned, None
        if spawned is not None:
            await self._retire(spawned, self.close_timeout if timeout is None else timeout)
        if self._cuts:
            # A dead writer's unfinished batch that no new writer was started to cut back
            # (closing before the retry): cut it here, so what the app counts as dropped is
            # not in the files. Those files are the dead writer's; no one appends to them.
            with contextlib.suppress(OSError):
                apply_cuts(self._cuts)
                self._cuts = []

    async def _retire(self, spawned: _Spawned, timeout: float) -> None:
        spawned.close_send()  # end of input: the writer finishes, closes its files and exits
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(spawned.exited), timeout)
        # Its output has ended, so it is exiting: reap it rather than leave a zombie behind.
        deadline = time.monotonic() + min(1.0, timeout)
        while spawned.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        # Still running: it is stuck in the disk. It exits by itself once the write returns;
        # killing it could tear the line it is writing.
        if not spawned.exited.done():
            self._lost(spawned, running=True)

    # -- starting -----------------------------------------------------------------------------
    async def _running(self) -> _Spawned:
        spawned = self._spawned
        if spawned is None or not spawned.alive:
            if spawned is not None:
                spawned.close_send()
            self._spawned = spawned = self._spawn()
        if not spawned.ready.done():  # a start in progress (or one a cancelled batch left)
            await self._await_ready(spawned)
        if self._cuts:
            self._seq += 1
            cut = asyncio.get_running_loop().create_future()
            spawned.waiting[self._seq] = cut
            await self._send(spawned, frame(CUT_BACK, self._seq, orjson.dumps(self._cuts)))
            await cut
            self._cuts = []
        return spawned

    def _spawn(self) -> _Spawned:
        settings = dict(self.settings)
        if self.fault:
            settings["fault"], self.fault = self.fault, None
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            # vfork and exec: about a millisecond, once per spawn; asyncio's subprocess
            # API would add a child-watcher thread to the app for nothing.
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_DIR, str(request_read),
                 str(reply_write), orjson.dumps(settings).decode()],
                pass_fds=(request_read, reply_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as exc:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            raise WriterProcessUnavailable(f"cannot start the writer process: {exc}") from exc
        os.close(request_read)
        os.close(reply_write)
        _widen(request_write)
        os.set_blocking(request_write, False)
        os.set_blocking(reply_read, False)
        spawned = _Spawned(proc, request_write, reply_read)
        asyncio.get_running_loop().add_reader(reply_read, self._on_readable, spawned)
        return spawned

    async def _await_ready(self, spawned: _Spawned) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(spawned.ready), self.start_timeout)
        except (TimeoutError, WriterProcessError) as exc:
            spawned.close_send()
            if spawned.proc.poll() is None:
                spawned.proc.kill()
            self._lost(spawned)
            if self._spawned is spawned:
                self._spawned = None
            raise WriterProcessUnavailable(
                f"the writer process did not start (exit code {spawned.proc.poll()})"
            ) from exc
        self.starts += 1

    def _forget_after_fork(self) -> None:
        """In a forked child: the writer and its pipes are the parent's. Close our copies (the
        parent's writer sees end of input only once every copy is closed) and start afresh,
        under an owner name of our own."""
        spawned, self._spawned = self._spawned, None
        if spawned is not None:
            spawned.close_fds()
        self._cuts = []
        self.settings["owner"] = f"{self.settings['owner']}-fork{os.getpid()}"

    # -- the pipes ----------------------------------------------------------------------------
    async def _send(self, spawned: _Spawned, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        try:
            while view:
                if not spawned.alive:
                    raise WriterProcessError("the writer process exited")
                try:
                    view = view[os.write(spawned.send_fd, view) :]
                except BlockingIOError:
                    spawned.room = room = loop.create_future()
                    loop.add_writer(spawned.send_fd, _wake, room)
                    try:
                        await room
                    finally:
                        if spawned.room is room:  # else close_send has unregistered it
                            spawned.room = None
                            loop.remove_writer(spawned.send_fd)
        except BrokenPipeError as exc:
            raise WriterProcessError("the writer process exited") from exc
        except BaseException:
            if view and len(view) < len(data):
                # Cut off mid-frame (cancelled): the stream is out of step. The writer drops
                # the partial frame at end of input and exits; the next batch starts anew.
                spawned.close_send()
            raise

    def _on_readable(self, spawned: _Spawned) -> None:
        try:
            data = os.read(spawned.recv_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(spawned)
            return
        buffer = spawned.buffer
        buffer += data
        size = HEADER.size
        while len(buffer) >= size:
            kind, length, seq = HEADER.unpack_from(buffer)
            if len(buffer) < size + length:
                break
            body = bytes(buffer[size : size + length])
            del buffer[: size + length]
            self._on_reply(spawned, kind, seq, body)

    def _on_reply(self, spawned: _Spawned, kind: int, seq: int, body: bytes) -> None:
        if kind == READY:
            if not spawned.ready.done():
                spawned.ready.set_result(None)
            return
        if kind == INTENT:
            spawned.intents[seq] = orjson.loads(body)
            return
        spawned.intents.pop(seq, None)
        waiter = spawned.waiting.pop(seq, None)
        if waiter is None or waiter.done():
            return
        if kind == DONE:
            waiter.set_result(None)
        elif kind == FAILED:
            waiter.set_exception(WriterProcessError(body.decode("utf-8", "replace")))

    def _lost(self, spawned: _Spawned, *, running: bool = False) -> None:
        """The writer's output ended: it exited (or was killed). Fail what it still owed.

        `running`: given up on while still alive (stuck in the disk at close). What it was
        writing is not cut back then: it may still be writing there.
        """
        if spawned.exited.done():
            return
        spawned.exited.set_result(None)
        with contextlib.suppress(OSError, RuntimeError):
            asyncio.get_running_loop().remove_reader(spawned.recv_fd)
        spawned.close_send()
        spawned.close_fds()
        if not running:
            for parts in spawned.intents.values():
                self._cuts.extend(parts)
        spawned.intents.clear()
        code = spawned.proc.poll()
        error = WriterProcessError(f"the writer process exited (code {code})")
        if not spawned.ready.done():
            spawned.ready.set_exception(error)
            spawned.ready.exception()  # retrieved: only `_await_ready` may be waiting for it
        for waiter in spawned.waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
                # Marked retrieved: a batch still waiting raises it; one whose wait already
                # ended (timed out, closed) must not leave "exception never retrieved".
                waiter.exception()
        spawned.waiting.clear()
