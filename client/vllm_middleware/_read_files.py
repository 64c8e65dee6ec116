"""The reader's file layer: which entries of a log tree are read, and how, safely.

The tree may be written by others while it is read (workers, retention, people). Only regular
files are opened, without following symbolic links unless asked (`follow_symlinks=True`), and
with O_NONBLOCK, so that a FIFO named like a log file cannot block a read. Anything else named
like a log file is skipped and counted. Gzip files are inflated in bounded steps: a cut file
keeps every complete record before the cut, a file that is not gzip is counted as damaged.
Compression in place (`_compress.py`) briefly leaves `X.jsonl` beside `X.jsonl.gz` (or a crash
does): only `X.jsonl` of such a pair is read, and a listed `X.jsonl` that is gone when opened is
read from `X.jsonl.gz`, so every record is read once.
Memory is bounded by the read chunk plus about twice the longest line; lines over
`max_line_bytes` are skipped and counted.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import orjson

from ._compact import iter_compacted
from ._exceptions import LogReadError

__all__ = ["DEFAULT_MAX_LINE_BYTES", "ReadStats", "iter_documents", "list_log_files"]

logger = logging.getLogger("vllm_middleware")

#: Records longer than this are skipped (and counted in `ReadStats.long_lines`) by default.
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024

_CHUNK = 4 * 1024 * 1024
# `.parquet`: days compacted by `vllm-mw compact` (`_compact.py`), read back record by record.
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_PLAIN = (".jsonl", ".json")  # the names compression in place gives a ".gz"
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
# An entry that turned into something else between the listing and the open (a link, a
# directory, a FIFO without writer on some systems): skipped like a non-regular file.
_NOT_REGULAR_ERRNOS = frozenset((errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK))


@dataclass
class ReadStats:
    """What a read pass met besides good records (pass one to `iter_logs` to collect it)."""

    files: int = 0
    records: int = 0
    torn_tails: int = 0
    bad_lines: int = 0
    media_restored: int = 0  # media references replaced by their data (restore_media=True)
    media_missing: int = 0  # references left as they are: file not stored, missing or altered
    media_refused: int = 0  # references left as they are: failed a safety check
    skipped_entries: int = 0  # named like a log file, but a directory, FIFO, socket or device
    skipped_links: int = 0  # symbolic links not followed (follow_symlinks=False)
    damaged_files: int = 0  # not gzip, or corrupt: records before the damage are kept
    long_lines: int = 0  # records over max_line_bytes, skipped


def _is_log_name(name: str) -> bool:
    return not name.startswith((".", "_")) and name.endswith(_SUFFIXES)


def _subdirs(
    directory: str, prefix: str, follow: bool, stats: ReadStats
) -> Iterator[os.DirEntry[str]]:
    """Entries of `directory` named `prefix...` that are directories (links only if `follow`)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            if not follow and entry.is_symlink():
                stats.skipped_links += 1
            elif entry.is_dir(follow_symlinks=follow):
                yield entry


def _log_files(directory: str, follow: bool, stats: ReadStats) -> list[Path]:
    files: list[Path] = []
    with os.scandir(directory) as scan:
        entries = list(scan)
    plain = {entry.name for entry in entries if entry.is_file(follow_symlinks=False)}
    for entry in entries:
        if not _is_log_name(entry.name):
            continue
        if entry.name.endswith(".gz") and entry.name[:-3] in plain:
            continue  # a compression in progress or interrupted: the plain file is read
        if not follow and entry.is_symlink():
            stats.skipped_links += 1
        elif entry.is_file(follow_symlinks=follow):
            files.append(Path(entry.path))
        else:
            stats.skipped_entries += 1
            logger.warning("skipped %s: not a regular file", entry.path)
    files.sort()
    return files


def check_root(root: Path) -> None:
    """Refuse what cannot be a log directory, with the reason."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise LogReadError(f"log directory {str(root)!r} {what}")
    name = Path(os.path.abspath(root)).name
    if name.startswith(("date=", "host=")):
        raise LogReadError(
            f"{str(root)!r} is a partition folder, not a log directory: pass the directory "
            "that holds the date=... folders and select with start_date/end_date/host"
        )


def list_log_files(
    root: Path,
    lo: str | None,
    hi: str | None,
    want_host: str | None,
    *,
    follow_symlinks: bool,
    stats: ReadStats,
) -> Iterator[Path]:
    """Log files under `root` in (date, host, name) order, pruned by partition.

    Flat files in `root` itself (the original tool's layout) come first, when no host is set.
    """
    check_root(root)
    dates = sorted(
        (entry.name, entry.path)
        for entry in _subdirs(str(root), "date=", follow_symlinks, stats)
        if (lo is None or entry.name[5:] >= lo) and (hi is None or entry.name[5:] <= hi)
    )
    if want_host is None:
        yield from _log_files(str(root), follow_symlinks, stats)
    for _, day_dir in dates:
        hosts = sorted(
            (entry.name, entry.path)
            for entry in _subdirs(day_dir, "host=", follow_symlinks, stats)
            if want_host is None or entry.name == want_host
        )
        for _, host_dir in hosts:
            yield from _log_files(host_dir, follow_symlinks, stats)


class _Damaged(Exception):
    """The bytes are not what the file's name says (not gzip, or corrupt)."""


class _Cut(Exception):
    """A gzip stream ends before its end marker (the file was cut)."""


def _open_regular(path: Path, follow: bool, stats: ReadStats) -> int | None:
    """A descriptor on `path` if it is (still) a regular file; None if gone or not regular."""
    try:
        fd = os.open(path, _OPEN_FLAGS | (0 if follow else _NOFOLLOW))
    except FileNotFoundError:  # removed (retention, compaction) since it was listed
        return None
    except OSError as exc:
        if exc.errno in _NOT_REGULAR_ERRNOS:
            stats.skipped_entries += 1
            logger.warning("skipped %s: not a regular file (%s)", path, exc.strerror)
            return None
        raise LogReadError(f"cannot read {path}: {exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise LogReadError(f"cannot read {path}: {exc}") from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        stats.skipped_entries += 1
        logger.warning("skipped %s: not a regular file", path)
        return None
    return fd


def _raw_chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, _CHUNK):
        yield chunk


def _inflate(inflater: zlib._Decompress, data: bytes) -> Iterator[bytes]:
    """All output of `data`, at most one chunk at a time (a small bomb stays small in memory)."""
    while True:
        try:
            out = inflater.decompress(data, _CHUNK)
        except zlib.error as exc:
            raise _Damaged(str(exc)) from None
        if out:
            yield out
        if inflater.eof:
            return
        data = inflater.unconsumed_tail
        if not data and len(out) < _CHUNK:
            return


def _gunzip(raw: Iterator[bytes]) -> Iterator[bytes]:
    inflater = zlib.decompressobj(_GZIP_WBITS)
    fed = False
    for data in raw:
        while data:
            fed = True
            yield from _inflate(inflater, data)
            if not inflater.eof:
                break
            # One member ended: what follows is another member (concatenated gzip files), or
            # zero padding that some tools leave.
            data = inflater.unused_data
            inflater = zlib.decompressobj(_GZIP_WBITS)
            fed = False
            if not data.strip(b"\x00"):
                data = b""
    if fed:
        raise _Cut


class _Splitter:
    """Cuts a byte stream into documents: lines (`.jsonl`) or pretty records (`.json`).

    A document split over chunks grows in one bytearray (realloc: no copy per chunk, and the
    read chunks are freed at once, so the heap does not keep them) and is handed on as it is,
    so a long line costs about its size, never a copy per chunk.
    """

    def __init__(self, pretty: bool, limit: int | None, path: Path, stats: ReadStats) -> None:
        self.pretty = pretty
        self.limit = limit
        self.path = path
        self.stats = stats
        self.pending: bytearray | None = None  # the unfinished document
        self.skipping = False  # inside a document over the limit, until its end
        self.carry = b""  # pretty only: bytes that may begin the next delimiter

    def _too_long(self, size: int) -> None:
        self.stats.long_lines += 1
        logger.warning(
            "skipped a record of more than %d bytes in %s (max_line_bytes)", size, self.path
        )

    def _hold(self, piece: bytes) -> None:
        if self.skipping or not piece:
            return
        pending = self.pending
        size = len(piece) if pending is None else len(pending) + len(piece)
        if self.limit is not None and size > self.limit:
            self._too_long(size)
            self.pending, self.skipping = None, True
        elif pending is None:
            self.pending = bytearray(piece)
        else:
            pending += piece

    def _close(self, piece: bytes) -> bytes | bytearray:
        """The document that `piece` ends (b"" when skipped)."""
        if self.skipping:
            self.skipping = False
            return b""
        doc: bytes | bytearray = piece
        if self.pending is not None:
            doc, self.pending = self.pending, None
            doc += piece
        if self.limit is not None and len(doc) > self.limit:
            self._too_long(len(doc))
            return b""
        return doc

    def feed(self, chunk: bytes) -> list[bytes | bytearray]:
        return self._pretty(chunk) if self.pretty else self._lines(chunk)

    def _lines(self, chunk: bytes) -> list[bytes | bytearray]:
        lines = chunk.split(b"\n")
        last = lines.pop()
        docs = cast("list[bytes | bytearray]", lines)  # the first may become a bytearray
        if docs:
            docs[0] = self._close(lines[0])
            if self.limit is not None and len(chunk) > self.limit:
                for index in range(1, len(docs)):
                    if len(docs[index]) > self.limit:
                        self._too_long(len(docs[index]))
                        docs[index] = b""
        self._hold(last)
        return docs

    def _pretty(self, chunk: bytes) -> list[bytes | bytearray]:
        # Pretty records end with a line holding only "}" (nested lines are indented).
        buf = self.carry + chunk if self.carry else chunk
        docs: list[bytes | bytearray] = []
        start = 0
        while (end := buf.find(b"\n}\n", start)) >= 0:
            docs.append(self._close(buf[start : end + 2]))
            start = end + 3
        keep = max(start, len(buf) - 2)
        self._hold(buf[start:keep])
        self.carry = buf[keep:]
        return docs

    def rest(self) -> bytes:
        """What follows the last complete document (b"" when it was over the limit)."""
        if self.skipping:
            return b""
        return bytes(self.pending or b"") + self.carry


def iter_documents(
    path: Path, *, follow_symlinks: bool, max_line_bytes: int | None, stats: ReadStats
) -> Iterator[bytes | bytearray]:
    """Raw JSON documents of one file; a torn tail is dropped and counted.

    A last document without its newline is kept when it parses (a writer that did not end
    its last line), else counted as a torn tail.
    """
    fd = _open_regular(path, follow_symlinks, stats)
    if fd is None and path.name.endswith(_PLAIN) and not os.path.lexists(path):
        # Compressed in place since it was listed: the same records are in `X.gz` now.
        path = path.with_name(path.name + ".gz")
        fd = _open_regular(path, follow_symlinks, stats)
    if fd is None:
        return
    name = path.name
    if name.endswith(".parquet"):
        os.close(fd)  # checked to be a regular file; DuckDB opens it by name
        yield from iter_compacted(path)
        return
    splitter = _Splitter(name.endswith((".json", ".json.gz")), max_line_bytes, path, stats)
    try:
        chunks = _raw_chunks(fd)
        if name.endswith(".gz"):
            chunks = _gunzip(chunks)
        for chunk in chunks:
            yield from splitter.feed(chunk)
    except _Damaged as exc:
        stats.damaged_files += 1
        logger.warning("stopped reading %s: damaged (%s)", path, exc)
        return
    except _Cut:
        stats.torn_tails += 1
        logger.warning("%s is cut short: kept the records before the cut", path)
        return
    except OSError as exc:
        raise LogReadError(f"cannot read {path}: {exc}") from exc
    finally:
        os.close(fd)
    rest = splitter.rest()
    if rest.strip():
        try:
            orjson.loads(rest)
        except orjson.JSONDecodeError:
            stats.torn_tails += 1
            logger.warning("skipped a torn last record in %s (%d bytes)", path, len(rest))
        else:
            yield rest
