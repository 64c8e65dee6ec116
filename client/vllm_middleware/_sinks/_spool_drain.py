"""`vllm-mw spool drain`: replay spools to a given Redis, including stranded and foreign ones.

The replay itself is the spooling sink's (`_spooling_sink.py`): batch markers, damage
accounting, orphan adoption; no shipper is involved. A spool directory belongs to one stream
and one Redis address; a segment left under another address (the Redis moved, the URL changed)
would wait forever. Draining moves such segments into the target Redis's directory first
(under their flock, so never one a live process holds; `rename` keeps the lock and is atomic
on one file system), then lets a sink for the target Redis adopt and replay everything there.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from .._keys import StreamKeys
from .._partition import fsync_dir, sanitize_partition_value
from ._redis_sink import RedisStreamSink
from ._shipping_settings import ShippingSettings, Tally
from ._spool_inventory import spool_root
from ._spooling_sink import SpoolingSink

__all__ = ["DrainResult", "drain_spools", "spool_directory_for"]

_SEGMENT_SUFFIX = ".seg"


@dataclass
class DrainResult:
    target: str
    moved: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # segments a live process holds: left alone
    replayed: int = 0
    damaged_regions: int = 0
    remaining_bytes: int = 0
    error: str | None = None


def _sink(redis_url: str, stream: str, root: Path) -> SpoolingSink:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    settings = ShippingSettings(spool=True, spool_dir=str(root))
    redis_sink = RedisStreamSink(
        client, keys=StreamKeys(stream), owns_client=True, timeout=settings.redis_timeout
    )
    return SpoolingSink(redis_sink, settings, Tally())


def spool_directory_for(redis_url: str, stream: str, root: str | None = None) -> Path:
    """The directory a client of `redis_url` and `stream` spools into under `root`."""
    return _sink(redis_url, stream, spool_root(root)).spool_directory()


def _move_stranded(source: Path, target: Path, result: DrainResult) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob(f"*{_SEGMENT_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # replayed and removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                result.held.append(str(path))
                continue
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                continue  # its owner replayed it and a new file took the name
            os.rename(path, target / path.name)
            result.moved.append(str(path))
        finally:
            os.close(fd)
    if result.moved:
        fsync_dir(source)
        fsync_dir(target)


async def _replay(sink: SpoolingSink, result: DrainResult, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    await sink.redis_sink.redis.ping()  # fail early and clearly when the target is unreachable
    await sink.work_backlog()  # opens the spool and adopts every segment nobody holds
    while sink.spool is not None and sink.spool:
        if not sink.healthy:
            result.error = sink.counters.last_error or "Redis refused the replay"
            break
        if time.monotonic() > deadline:
            result.error = f"not drained within {timeout:g} s"
            break
        await sink.work_backlog()
    result.replayed = sink.counters.replayed
    result.damaged_regions = sink.counters.spool_damaged
    result.remaining_bytes = sink.spool.nbytes if sink.spool is not None else 0


async def _drain(
    redis_url: str, stream: str, root: Path, sources: list[Path], timeout: float
) -> DrainResult:
    sink = _sink(redis_url, stream, root)
    target = sink.spool_directory()
    result = DrainResult(target=str(target))
    try:
        for source in sources:
            if source.resolve() != target.resolve():
                await asyncio.to_thread(_move_stranded, source, target, result)
        await _replay(sink, result, timeout)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sink.aclose(), 5)
    return result


def drain_spools(
    redis_url: str,
    *,
    stream: str = "vllm:logs",
    root: str | None = None,
    sources: list[str] | None = None,
    every: bool = False,
    timeout: float = 300.0,
) -> DrainResult:
    """Replay the spool of `redis_url` + `stream` under `root`, after moving in the stranded
    segments of `sources` (or, with `every`, of every other spool directory under `root`)."""
    base = spool_root(root)
    dirs = [Path(s) for s in sources or []]
    if every and base.is_dir():
        # This stream's directories only (`<stream>-<address hash>`): never another stream's.
        prefix = sanitize_partition_value(stream)
        dirs += sorted(
            p for p in base.iterdir() if p.is_dir() and p.name.rsplit("-", 1)[0] == prefix
        )
    return asyncio.run(_drain(redis_url, stream, base, dirs, timeout))
