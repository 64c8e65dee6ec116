"""Base64 media in records: moved to content-addressed files, or reduced to a reference.

Multimodal requests carry images, audio and video as base64 (data URLs, `input_audio.data`,
embeddings) and vllm-omni replies carry speech in `message.audio.data`. Kept inline they make
records of megabytes. With the "reference" policy each blob is decoded, written once under
`media/<sha256[:2]>/<sha256>.<ext>` and replaced in the record by
`{"media_ref": {"sha256", "mime", "bytes", "path", "stored", "encoding"}}`; "drop" keeps the same
reference without writing the file.

The request path only walks list contents and builds the record with short placeholder tokens
where the blobs were (copy-on-write: the caller's objects are never touched), then encodes that
small record at once, so later changes the caller makes to its objects cannot leak into it.
Decoding, hashing and writing run on one dedicated thread, which swaps the tokens in the encoded
bytes for the references; the record is submitted when that is done.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson

from ._media_files import media_name
from ._modes import LOG_MODES, FileModes, create_file, make_dirs
from ._partition import fsync_dir
from ._record import encode_record, shrink_record

__all__ = [
    "MEDIA_POLICIES",
    "MediaJob",
    "MediaPipeline",
    "MediaPolicy",
    "media_pipeline",
]

logger = logging.getLogger("vllm_middleware")

MediaPolicy = Literal["reference", "inline", "drop"]
MEDIA_POLICIES: tuple[str, ...] = ("reference", "inline", "drop")

_URL_KEYS = frozenset(("image_url", "audio_url", "video_url"))
_EMBED_KEYS = frozenset(("image_embeds", "audio_embeds", "video_embeds"))
_PART_KEYS = _URL_KEYS | _EMBED_KEYS | {"input_audio"}
_HEADER_SCAN = 256  # a data URL's "data:<mime>;<params>;base64," fits in this many characters
_AUDIO_FORMATS = {"mp3": "audio/mpeg", "m4a": "audio/mp4"}
_SAFE_EXT = re.compile(r"[^a-z0-9]")
# Blob text waiting for the media thread at most; beyond, blobs get a reference without a hash
# (counted as skipped) rather than holding unbounded memory behind a slow disk.
_MAX_PENDING_CHARS = 512 * 1024 * 1024
_KNOWN_FILES_MAX = 10_000
# A stored blob that new records reference again gets its mtime refreshed at most this often:
# media retention (`_media_gc.py`) only deletes files unreferenced and older than a grace period
# far longer than this, so a file a record in flight references is never taken.
_TOUCH_S = 600.0
_warned_shared = False

Ship = Callable[[bytes], None]
Failed = Callable[[Any, "BaseException | None"], None]


class _Blob(NamedTuple):
    token: str  # placeholder in the record until the reference is known
    text: str  # the caller's string (never copied on the request path)
    start: int  # where the base64 begins in `text`
    mime: str
    header: str | None  # a data URL's header when it is not exactly "data:<mime>;base64"


class MediaJob(NamedTuple):
    blobs: list[_Blob]
    chars: int  # base64 characters held, for the backlog bound


class _BlobCollector:
    """Copy-on-write walk of one record; collects the blobs it replaced with tokens."""

    __slots__ = ("blobs", "min_chars", "nonce")

    def __init__(self, min_chars: int) -> None:
        self.min_chars = min_chars
        self.blobs: list[_Blob] = []
        self.nonce = ""

    def _token(self, text: str, start: int, mime: str, header: str | None) -> str:
        if not self.nonce:
            self.nonce = os.urandom(8).hex()
        token = f"vllm-mw-media:{self.nonce}:{len(self.blobs)}"
        self.blobs.append(_Blob(token, text, start, mime, header))
        return token

    def data_url(self, value: str) -> str | None:
        if len(value) < self.min_chars or not value.startswith("data:"):
            return None
        comma = value.find(",", 0, _HEADER_SCAN)
        if comma < 0 or not value.endswith(";base64", 0, comma):
            return None  # a URL-encoded data URL is text, not a blob
        header = value[:comma]
        mime = header[5:].partition(";")[0] or "application/octet-stream"
        exact = header == f"data:{mime};base64"
        return self._token(value, comma + 1, mime, None if exact else header)

    def raw(self, value: Any, mime: str) -> str | None:
        if type(value) is not str or len(value) < self.min_chars:
            return None
        return self._token(value, 0, mime, None)

    def part(self, part: dict[str, Any]) -> dict[str, Any] | None:
        new: dict[str, Any] | None = None
        for key, value in part.items():
            if key not in _PART_KEYS:
                continue
            replaced: Any = None
            if key in _URL_KEYS:
                if type(value) is str:  # the bare {"image_url": "data:..."} form
                    replaced = self.data_url(value)
                elif type(value) is dict and type(value.get("url")) is str:
                    token = self.data_url(value["url"])
                    replaced = None if token is None else {**value, "url": token}
            elif key == "input_audio":
                if type(value) is dict:
                    token = self.raw(value.get("data"), _audio_mime(value.get("format")))
                    replaced = None if token is None else {**value, "data": token}
            elif type(value) is str:
                replaced = self.raw(value, "application/octet-stream")
            elif type(value) is dict:  # embeddings keyed by name
                changed = {k: self.raw(v, "application/octet-stream") for k, v in value.items()}
                if any(t is not None for t in changed.values()):
                    replaced = {k: value[k] if t is None else t for k, t in changed.items()}
            if replaced is not None:
                if new is None:
                    new = dict(part)
                new[key] = replaced
        return new

    def messages(self, messages: list[Any]) -> list[Any] | None:
        new: list[Any] | None = None
        for position, message in enumerate(messages):
            # Plain-text chats stop here: one lookup and one type check per message.
            content = message.get("content") if type(message) is dict else None
            if type(content) is not list:
                continue
            parts: list[Any] | None = None
            for index, part in enumerate(content):
                if type(part) is dict and (changed := self.part(part)) is not None:
                    if parts is None:
                        parts = list(content)
                    parts[index] = changed
            if parts is not None:
                if new is None:
                    new = list(messages)
                new[position] = {**message, "content": parts}
        return new

    def response(self, response: dict[str, Any]) -> dict[str, Any] | None:
        choices = response.get("choices")
        if type(choices) is not list:
            return None
        new: list[Any] | None = None
        for index, choice in enumerate(choices):
            message = choice.get("message") if type(choice) is dict else None
            audio = message.get("audio") if type(message) is dict else None
            if type(audio) is not dict:
                continue
            assert message is not None  # narrowed by the checks above
            token = self.raw(audio.get("data"), _audio_mime(audio.get("format") or "wav"))
            if token is None:
                continue
            if new is None:
                new = list(choices)
            new[index] = {**choice, "message": {**message, "audio": {**audio, "data": token}}}
        return None if new is None else {**response, "choices": new}


def _audio_mime(fmt: Any) -> str:
    if not isinstance(fmt, str) or not fmt:
        return "application/octet-stream"
    fmt = fmt.lower()
    return _AUDIO_FORMATS.get(fmt) or f"audio/{_SAFE_EXT.sub('', fmt)[:10] or 'unknown'}"


def _decode(blob: _Blob) -> bytes | None:
    """The blob's bytes, or None when its text is not canonical base64: only that is moved
    out, since re-encoding the bytes must give back the exact text (restored records equal
    what was sent)."""
    text = blob.text[blob.start :] if blob.start else blob.text
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if raw:
        # Padding bits may be non-zero in the last quantum only; checking it is enough.
        padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
        if base64.b64encode(raw[-(3 - padding) :]) != text[-4:].encode("ascii"):
            return None
    return raw


class MediaPipeline:
    """Per-client media handling: `prepare` on the request path, the rest on its own thread."""

    def __init__(
        self,
        policy: MediaPolicy,
        log_dir: str | os.PathLike[str],
        media_dir: str | os.PathLike[str],
        *,
        min_bytes: int,
        max_record_bytes: int,
        fsync: bool,
        modes: FileModes = LOG_MODES,
    ) -> None:
        self.policy = policy
        self.modes = modes
        self.max_record_bytes = max_record_bytes
        self.store = policy == "reference"
        self.root = Path(media_dir)
        prefix = os.path.relpath(os.path.abspath(media_dir), os.path.abspath(log_dir))
        self.prefix = "" if prefix == "." else prefix.replace(os.sep, "/") + "/"
        # base64 length from which the decoded blob reaches min_bytes
        self.min_chars = max(1, -(-min_bytes * 4 // 3))
        self.fsync = fsync
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._known: dict[str, float] = {}  # name -> when it was written or last touched
        self._closed = False
        self.pending_chars = 0
        # Written by the media thread only (one writer), read by statistics.
        self.stored = 0
        self.deduplicated = 0
        self.failed = 0
        self.kept_inline = 0
        # Written on the loop only.
        self.skipped = 0
        self.truncated = 0
        #: "reference" fell back to "drop" (Redis mode without media_dir): say so at the first
        #: blob met, not for clients that never see one
        self.warn_unshared = False

    # -- request path -----------------------------------------------------------------------
    def prepare(
        self, record: dict[str, Any], *, messages: bool = True, response: bool = True
    ) -> MediaJob | None:
        """Swap blobs in `record` for tokens (copy-on-write); None when it has none.

        `messages` / `response` False: the caller knows that part holds no blob (its encoded
        JSON is shorter than `min_chars`), so it is not walked.
        """
        # The walker is only built when a list content or a reply audio is seen: text chats
        # cost a type check per message and per choice.
        walk: _BlobCollector | None = None
        chat = record.get("messages") if messages else None
        if type(chat) is list:
            for message in chat:
                if type(message) is dict and type(message.get("content")) is list:
                    walk = _BlobCollector(self.min_chars)
                    if (changed := walk.messages(chat)) is not None:
                        record["messages"] = changed
                    break
        reply = record.get("response") if response else None
        choices = reply.get("choices") if type(reply) is dict else None
        if type(choices) is list and reply is not None:
            for choice in choices:
                message = choice.get("message") if type(choice) is dict else None
                if type(message) is dict and message.get("audio") is not None:
                    walk = walk or _BlobCollector(self.min_chars)
                    if (replaced := walk.response(reply)) is not None:
                        record["response"] = replaced
                    break
        if walk is None or not walk.blobs:
            return None
        if self.warn_unshared:
            self.warn_unshared = False
            _warn_unshared_once()
        return MediaJob(walk.blobs, sum(len(b.text) - b.start for b in walk.blobs))

    def defer(self, job: MediaJob, record: dict[str, Any], ship: Ship, failed: Failed) -> None:
        """Finish `record` off the loop, then `ship` its bytes from the loop.

        Without a running loop (a finalizer in another thread), or after `drain` (a stream
        finalized after close), the work runs here instead.
        """
        request_id = record.get("request_id")
        # Encoded now, with tokens where the blobs were: small, and safe from changes the
        # caller makes to its own objects after the call returned.
        data = encode_record(record)
        try:
            loop = None if self._closed else asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            try:
                self._ship(ship, *self._finish(job, data))
            except Exception as exc:
                failed(request_id, exc)
            return
        if self.pending_chars + job.chars > _MAX_PENDING_CHARS:
            self.skipped += len(job.blobs)
            self._ship(ship, *self._limit(self._unresolved(job, data)))
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-mw-media")
        self.pending_chars += job.chars
        future = loop.run_in_executor(self._executor, self._finish, job, data)

        def settle(fut: asyncio.Future[tuple[bytes, bool]]) -> None:  # runs on the loop
            self.pending_chars -= job.chars
            self._pending.discard(fut)
            try:
                self._ship(ship, *fut.result())
            except BaseException as exc:  # includes a cancelled future at shutdown
                failed(request_id, exc)

        self._pending.add(future)
        future.add_done_callback(settle)

    def _ship(self, ship: Ship, data: bytes, truncated: bool) -> None:
        self.truncated += truncated
        ship(data)

    def _finish(self, job: MediaJob, data: bytes) -> tuple[bytes, bool]:
        return self._limit(self.resolve(job, data))

    def _limit(self, data: bytes) -> tuple[bytes, bool]:
        """Apply the record size cap (parsing the record back only when it is over)."""
        if len(data) <= self.max_record_bytes:
            return data, False
        return shrink_record(orjson.loads(data), len(data), self.max_record_bytes), True

    def statistics(self) -> dict[str, int]:
        return {
            "media_stored": self.stored,
            "media_deduplicated": self.deduplicated,
            "media_failed": self.failed,
            "media_kept_inline": self.kept_inline,
            "media_skipped": self.skipped,
            "media_pending": self.pending,
        }

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def drain(self, timeout: float) -> None:
        """Wait for deferred records (their callbacks submit them), then stop the thread."""
        self._closed = True
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=not self._pending, cancel_futures=True)
            self._executor = None

    # -- media thread -----------------------------------------------------------------------
    def resolve(self, job: MediaJob, data: bytes) -> bytes:
        """Decode, hash (and write) each blob; put its reference where its token is."""
        for blob in job.blobs:
            data = data.replace(f'"{blob.token}"'.encode(), self._reference(blob))
        return data

    def _unresolved(self, job: MediaJob, data: bytes) -> bytes:
        for blob in job.blobs:
            ref = {
                "sha256": None,
                "mime": blob.mime,
                "bytes": (len(blob.text) - blob.start) * 3 // 4,  # estimate: not decoded
                "stored": False,
                "skipped": "media backlog",
            }
            data = data.replace(f'"{blob.token}"'.encode(), orjson.dumps({"media_ref": ref}))
        return data

    def _reference(self, blob: _Blob) -> bytes:
        raw = _decode(blob)
        if raw is None:  # not canonical base64: keep the text exactly as it was sent
            self.kept_inline += 1
            return orjson.dumps(blob.text)
        digest = hashlib.sha256(raw).hexdigest()
        ref: dict[str, Any] = {"sha256": digest, "mime": blob.mime, "bytes": len(raw)}
        ref["encoding"] = "base64" if blob.start == 0 else "data_url"
        if blob.header is not None:
            ref["header"] = blob.header
        if self.store:
            name = media_name(digest, blob.mime)
            try:
                self._write(name, raw)
            except OSError as exc:
                self.failed += 1
                if self.failed == 1 or self.failed % 1000 == 0:
                    logger.warning("could not write media file %s: %s", name, exc)
                ref["stored"] = False
                ref["error"] = f"{type(exc).__name__}: {exc}"
            else:
                ref["path"] = self.prefix + name
                ref["stored"] = True
        else:
            ref["stored"] = False
        return orjson.dumps({"media_ref": ref})

    def _write(self, name: str, raw: bytes) -> None:
        """Write a blob once: skip it if present, else temp file + fsync + atomic rename."""
        path = self.root / name
        if self._stored(name, path):
            self.deduplicated += 1
            return
        make_dirs(path.parent, self.modes.dir)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            fd, _ = create_file(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), self.modes.file)
            with open(fd, "wb") as handle:
                handle.write(raw)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)  # same content under the same name: a race is harmless
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.fsync:
            fsync_dir(path.parent)
        self.stored += 1
        self._remember(name)

    def _stored(self, name: str, path: Path) -> bool:
        """Whether the blob is stored already (then its mtime is fresh: see `_TOUCH_S`)."""
        now = time.monotonic()
        touched = self._known.get(name)
        if touched is not None and now - touched < _TOUCH_S:
            return True
        try:
            os.utime(path)
        except FileNotFoundError:  # never written, or deleted by media retention: write it
            self._known.pop(name, None)
            return False
        except OSError:  # not ours to touch (another owner's file)
            if not path.exists():
                self._known.pop(name, None)
                return False
        self._remember(name)
        return True

    def _remember(self, name: str) -> None:
        if len(self._known) >= _KNOWN_FILES_MAX:
            self._known.clear()
        self._known[name] = time.monotonic()


def media_pipeline(
    policy: MediaPolicy,
    *,
    log_dir: str | os.PathLike[str],
    media_dir: str | os.PathLike[str] | None,
    shared: bool,
    min_bytes: int,
    max_record_bytes: int,
    fsync: bool,
    modes: FileModes = LOG_MODES,
) -> MediaPipeline | None:
    """The pipeline for a client's settings; None for "inline" (records are left as they are).

    `shared`: records are read on other hosts (Redis mode), so a default `media_dir` under
    this process's `log_dir` would be useless to them; "reference" becomes "drop" then.
    """
    if policy == "inline":
        return None
    unshared = media_dir is None and shared and policy == "reference"
    root = os.path.join(log_dir, "media") if media_dir is None else media_dir
    pipeline = MediaPipeline(
        "drop" if unshared else policy,
        log_dir,
        root,
        min_bytes=min_bytes,
        max_record_bytes=max_record_bytes,
        fsync=fsync,
        modes=modes,
    )
    pipeline.warn_unshared = unshared
    return pipeline


def _warn_unshared_once() -> None:
    global _warned_shared
    if not _warned_shared:
        _warned_shared = True
        logger.warning(
            "media_policy='reference' needs media_dir on a filesystem shared with the "
            "readers in Redis mode; media is dropped instead (hash and size kept)"
        )
