"""The media store's file names, and reading blobs back (`restore_media`) safely.

A record's `media_ref` is not trusted: an end user can put one in a message, and anyone who
can write the log tree can plant one. A reference is only restored from a regular file that
lies directly in `media_dir/<sha256[:2]>/`, named after the hash alone, reached without a
symbolic link, of the recorded size and whose content hashes to the recorded sha256.
Anything else leaves the reference in the record and is counted.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = ["RestoreCounts", "media_extension", "media_name", "restore_media_refs"]

# File extensions by media type: an allow-list, so that a caller's media type (free text in a
# data URL) never becomes part of a path. Other types are stored as ".bin".
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/jpg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/tiff": "tif",
    "image/svg+xml": "svg",
    "image/heic": "heic",
    "image/heif": "heif",
    "image/avif": "avif",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mp4": "m4a",
    "audio/aac": "aac",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/webm": "weba",
    "audio/pcm": "pcm",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "video/quicktime": "mov",
    "video/x-matroska": "mkv",
    "video/x-msvideo": "avi",
    "video/mpeg": "mpeg",
    "video/ogg": "ogv",
    "application/pdf": "pdf",
    "application/octet-stream": "bin",
}
_DIGEST = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"([0-9a-f]{64})\.([a-z0-9]{1,10})")
_READ = 1024 * 1024
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FD = os.open in os.supports_dir_fd and bool(_NOFOLLOW and _DIRECTORY)
# errno values that mean "a symbolic link or something other than what was expected is there"
_REFUSED_ERRNOS = frozenset((errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EMLINK))


def media_extension(mime: str) -> str:
    """The file extension for a media type, from the allow-list ("bin" for any other)."""
    return _EXTENSIONS.get(mime.strip().lower(), "bin")


def media_name(digest: str, mime: str) -> str:
    """A blob's path under `media_dir`: `<sha256[:2]>/<sha256>.<ext>`."""
    return f"{digest[:2]}/{digest}.{media_extension(mime)}"


class RestoreCounts(Protocol):
    """Counters a restore pass updates (the reader's `ReadStats` has these fields)."""

    media_restored: int
    media_missing: int
    media_refused: int


def restore_media_refs(value: Any, media_root: Path, counts: RestoreCounts) -> Any:
    """`value` with every `{"media_ref": ...}` that checks out replaced by the original text.

    Works in place on freshly parsed JSON and returns the (possibly replaced) value. A
    reference whose file is not there or not the original (dropped, deleted, altered) counts
    in `media_missing`; one that fails a safety check (not a sha256, a name not made from it,
    a symbolic link, not a regular file) in `media_refused`. Both stay as they are.
    """
    if type(value) is dict:
        ref = value.get("media_ref")
        if len(value) == 1 and type(ref) is dict:
            try:
                text = _restore(ref, media_root)
            except _Missing:
                counts.media_missing += 1
                return value
            except _Refused:
                counts.media_refused += 1
                return value
            counts.media_restored += 1
            return text
        for key, item in value.items():
            if type(item) in (dict, list):
                value[key] = restore_media_refs(item, media_root, counts)
    elif type(value) is list:
        for index, item in enumerate(value):
            if type(item) in (dict, list):
                value[index] = restore_media_refs(item, media_root, counts)
    return value


class _Missing(Exception):
    """No file for the reference, or not the original one."""


class _Refused(Exception):
    """The reference or its file failed a safety check."""


def _restore(ref: Mapping[str, Any], media_root: Path) -> str:
    if ref.get("stored") is not True:  # "drop" policy, backlog or a failed write: no file
        raise _Missing
    digest, rel, size = ref.get("sha256"), ref.get("path"), ref.get("bytes")
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise _Refused
    if type(size) is not int or size < 0 or not isinstance(rel, str):
        raise _Refused
    # Only the last component of `path` is used, and only when it is the hash itself plus an
    # extension: the directories come from the hash and `media_root`, never from the record.
    name = _NAME.fullmatch(rel.rpartition("/")[2])
    if name is None or name.group(1) != digest:
        raise _Refused
    try:
        raw = _read_regular(media_root, digest[:2], name.group(0), size)
    except FileNotFoundError:
        raise _Missing from None
    except OSError as exc:
        raise (_Refused if exc.errno in _REFUSED_ERRNOS else _Missing) from None
    if raw is None or hashlib.sha256(raw).hexdigest() != digest:
        raise _Missing  # truncated, grown or replaced: not the original
    text = base64.b64encode(raw).decode("ascii")
    if ref.get("encoding") != "data_url":
        return text
    header = ref.get("header")
    if not isinstance(header, str):
        header = f"data:{ref.get('mime')};base64"
    return f"{header},{text}"


def _read_regular(root: Path, subdir: str, name: str, size: int) -> bytes | None:
    """The file's bytes if it holds exactly `size` of them, else None.

    Opened relative to directory descriptors with O_NOFOLLOW, so a link swapped in between a
    check and the open is refused too; O_NONBLOCK so that a FIFO cannot block the reader.
    """
    with contextlib.ExitStack() as stack:
        if _DIR_FD:
            root_fd = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
            stack.callback(os.close, root_fd)
            sub_fd = os.open(
                subdir, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=root_fd
            )
            stack.callback(os.close, sub_fd)
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=sub_fd)
        else:  # no dir_fd (Windows): check each component, then open
            if stat.S_ISLNK(os.lstat(root / subdir).st_mode):
                raise _Refused
            path = root / subdir / name
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise _Refused
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        stack.callback(os.close, fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Refused
        if info.st_size != size:
            return None
        data = b"".join(_read_at_most(fd, size + 1))
    return data if len(data) == size else None


def _read_at_most(fd: int, limit: int) -> Iterator[bytes]:
    while limit > 0:
        chunk = os.read(fd, min(limit, _READ))
        if not chunk:
            return
        limit -= len(chunk)
        yield chunk
