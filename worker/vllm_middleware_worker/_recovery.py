"""Taking over the entries of dead consumers, without duplicating what they already wrote.

A consumer is dead when its heartbeat key has expired (the heartbeat runs in its own task, so a
slow disk does not look like death). The recovering worker takes a lock per dead consumer,
truncates the files named in the dead consumer's intent back to their pre-batch sizes (bytes
that were written but never acknowledged), then claims the dead consumer's pending entries and
writes them to its own files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis

from ._config import WorkerConfig

if TYPE_CHECKING:
    from ._consumer import StreamConsumer

__all__ = ["Recovery", "intent_fields"]

logger = logging.getLogger("vllm_middleware_worker")

_CLAIM_PAGE = 64  # entries: bundles of up to 64 KiB, so a page stays a few MB
_LOCK_TTL_MS = 120_000


class Recovery:
    def __init__(
        self, redis: aioredis.Redis, config: WorkerConfig, consumer: StreamConsumer
    ) -> None:
        self.redis = redis
        self.config = config
        self.consumer = consumer
        self.keys = consumer.keys

    async def undo_intent(self, name: str) -> int:
        """Truncate the files of `name`'s unacknowledged batches; returns bytes removed.

        Two batches at most (one written, one being acknowledged), one intent field each;
        cutting every file to each intent's offset leaves it at the lowest: both undone.
        """
        fields = intent_fields(name)
        raws = await self.redis.hmget(self.keys.inflight, fields)
        parts: list[Any] = []
        for raw in raws:
            if raw is None:
                continue
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                parts += orjson.loads(raw).get("parts", [])
        if not any(raw is not None for raw in raws):
            return 0
        removed = await asyncio.to_thread(self.truncate_parts, parts)
        await self.redis.hdel(self.keys.inflight, *fields)
        if removed:
            logger.warning("removed %d unacknowledged bytes written by %s", removed, name)
        return removed

    def truncate_parts(self, parts: list[Any]) -> int:
        """Cut each `[relative path, offset]` file back to `offset`; raises OSError."""
        root = Path(self.config.log_dir).resolve()
        removed = 0
        for part in parts:
            if not (isinstance(part, list) and len(part) == 2 and isinstance(part[1], int)):
                continue
            path = (root / str(part[0])).resolve()
            if not path.is_relative_to(root):  # an intent must never reach outside log_dir
                logger.error("ignored an intent naming a path outside log_dir: %s", part[0])
                continue
            # A path under something that is not a directory names no file either; any other
            # error is raised, and reported by the caller.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                size = path.stat().st_size
                if size > part[1]:
                    with open(path, "r+b") as handle:
                        handle.truncate(part[1])
                        handle.flush()
                        os.fsync(handle.fileno())
                    removed += size - part[1]
        return removed

    async def recover_dead_consumers(self) -> None:
        me = self.config.consumer
        try:
            consumers = await self.redis.xinfo_consumers(self.keys.stream, self.keys.group)
        except Exception as exc:  # no group yet
            if "NOGROUP" in str(exc):
                return
            raise
        for info in consumers:
            name = _text(info["name"])
            if name == me or await self.redis.exists(self.keys.heartbeat(name)):
                continue
            idle = int(info.get("pending", 0)) == 0
            intents = await self.redis.hmget(self.keys.inflight, intent_fields(name))
            if idle and all(raw is None for raw in intents):
                await self.redis.xgroup_delconsumer(self.keys.stream, self.keys.group, name)
                continue
            await self._recover(name)

    async def _recover(self, name: str) -> None:
        lock = f"{self.keys.stream}:recovering:{name}"
        me = self.config.consumer.encode()
        if not await self.redis.set(lock, me, nx=True, px=_LOCK_TTL_MS):
            return  # another worker is on it
        try:
            await self.undo_intent(name)
            moved = 0
            while True:
                pending = await self.redis.xpending_range(
                    self.keys.stream, self.keys.group, "-", "+", _CLAIM_PAGE, consumername=name
                )
                if not pending:
                    break
                ids = [p["message_id"] for p in pending]
                too_often = {
                    p["message_id"]: f"delivered {p['times_delivered']} times"
                    for p in pending
                    if p["times_delivered"] >= self.config.max_deliveries
                }
                claimed = await self.redis.xclaim(
                    self.keys.stream, self.keys.group, self.config.consumer, 0, ids
                )
                entries = [(entry_id, fields) for entry_id, fields in claimed]
                found = {entry_id for entry_id, _ in entries}
                # Entries deleted from the stream while pending come back without fields (or
                # not at all); acknowledge them so they leave the pending list.
                entries += [(entry_id, None) for entry_id in ids if entry_id not in found]
                await self.consumer.process(entries, undeliverable=too_often)
                moved += len(entries)
                await self.redis.pexpire(lock, _LOCK_TTL_MS)
            await self.redis.xgroup_delconsumer(self.keys.stream, self.keys.group, name)
            self.consumer.status.recovered_consumers += 1
            logger.warning("recovered %d pending entries of dead consumer %s", moved, name)
        finally:
            if await self.redis.get(lock) == me:
                await self.redis.delete(lock)


def intent_fields(consumer: str) -> tuple[str, str]:
    """The two intent fields of a consumer in the inflight hash (batches alternate between
    them); the first is the consumer's own name, as before read-ahead existed."""
    return consumer, f"{consumer}\x00next"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
