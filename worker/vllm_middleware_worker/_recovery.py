"""Taking over the entries of dead consumers, without duplicating what they already wrote.

A consumer is dead when its heartbeat key has expired (the heartbeat runs in its own task, so a
slow disk does not look like death). The recovering worker takes a lock per dead consumer,
truncates the files named in the dead consumer's intent back to their pre-batch sizes (bytes
that were written but never acknowledged), then claims the dead consumer's pending entries and
writes them to its own files. An intent that is not plausible (`_intent.py`) is refused: the
consumer's entries and intent are left as they are, the reason is stored in the `refused`
hash (`vllm-mw stats` shows it) and logged, and nothing is cut or claimed until a person
removes the intent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from vllm_middleware.storage import cut_back

from ._config import WorkerConfig
from ._intent import Cut, Intent, parse_intent, plan_cuts

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
        # One batch reads up to `batch_bytes`, and its last entry can hold a record of up to
        # `max_record_bytes`: an intent naming more is not one batch.
        self._max_batch_bytes = config.batch_bytes + config.max_record_bytes
        self._reported: set[str] = set()  # consumers whose refused intent was logged

    async def undo_intent(self, name: str) -> int | None:
        """Truncate the files of `name`'s unacknowledged batches; returns bytes removed, or
        None when its intents were refused (reported and left for a person).

        Two batches at most (one written, one being acknowledged), one intent field each;
        cutting every file to each intent's offset leaves it at the lowest: both undone.
        """
        fields = intent_fields(name)
        raws = await self.redis.hmget(self.keys.inflight, fields)
        if all(raw is None for raw in raws):
            return 0
        intents: list[Intent] = []
        for raw in raws:
            if raw is None:
                continue
            intent = parse_intent(raw, name, self._max_batch_bytes)
            if isinstance(intent, str):
                await self._refuse(name, intent, raws)
                return None
            if not await self._pending(name, intent.ids):
                reason = "its entries are no longer pending for it (stale or forged)"
                await self._refuse(name, reason, raws)
                return None
            intents.append(intent)
        paths = {path for intent in intents for path, _, _ in intent.parts}
        sizes = await asyncio.to_thread(self._sizes, paths)
        if isinstance(sizes, str):
            await self._refuse(name, sizes, raws)
            return None
        cuts = plan_cuts(intents, sizes)
        if isinstance(cuts, str):
            await self._refuse(name, cuts, raws)
            return None
        removed = await asyncio.to_thread(self.apply_cuts, cuts)
        await self.redis.hdel(self.keys.inflight, *fields)
        if removed:
            logger.warning("removed %d unacknowledged bytes written by %s", removed, name)
        return removed

    async def _pending(self, name: str, ids: tuple[str, str]) -> bool:
        """Both ends of the batch are still pending for `name` (not acknowledged)."""
        for entry_id in dict.fromkeys(ids):
            found = await self.redis.xpending_range(
                self.keys.stream, self.keys.group, entry_id, entry_id, 1, consumername=name
            )
            if not found:
                return False
        return True

    async def _refuse(self, name: str, reason: str, raws: list[Any]) -> None:
        shown = [raw.decode("utf-8", "replace")[:1000] for raw in raws if raw is not None]
        record = orjson.dumps({"reason": reason, "intents": shown, "at": time.time()})
        await self.redis.hset(self.keys.refused, name, record)
        self.consumer.status.refused_intents += 1
        if name not in self._reported:
            self._reported.add(name)
            logger.error(
                "refused to act on the intent of consumer %s (%s); its entries stay pending "
                "until a person removes the intent: HDEL %s %s",
                name,
                reason,
                self.keys.inflight,
                name,
            )

    def _inside(self, root: Path, relative: str) -> Path | None:
        """`root / relative` if it is a path inside `root` with no symlink on the way."""
        path = root / relative
        if path.resolve() != path:  # an intent must never reach outside log_dir
            return None
        return path

    def _sizes(self, paths: set[str]) -> dict[str, int | None] | str:
        root = Path(self.config.log_dir).resolve()
        sizes: dict[str, int | None] = {}
        for relative in paths:
            path = self._inside(root, relative)
            if path is None:
                return f"{relative[:200]!r} leads outside log_dir"
            try:
                sizes[relative] = path.stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                sizes[relative] = None
        return sizes

    def apply_cuts(self, cuts: Sequence[Cut]) -> int:
        """Cut each file back to its offset; returns the bytes removed; raises OSError."""
        root = Path(self.config.log_dir).resolve()
        removed = 0
        for cut in cuts:
            path = self._inside(root, cut.path)
            if path is None:
                logger.error("ignored a cut naming a path outside log_dir: %s", cut.path)
                continue
            removed += cut_back(path, cut.offset)  # other errors are reported by the caller
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
            if await self.undo_intent(name) is None:
                return  # refused: nothing cut, nothing claimed
            # Acted on (a person removed a refused intent, or there was none): no longer refused.
            await self.redis.hdel(self.keys.refused, name)
            self._reported.discard(name)
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
                await self.consumer.process(entries, dead_letter_reasons=too_often)
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
