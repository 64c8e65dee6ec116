"""Shipping records to the Redis stream the workers consume.

A batch goes out as one MULTI/EXEC transaction: the XADDs plus a short-lived marker key named
after the batch. A transaction is all-or-nothing, so when a flush fails ambiguously (the
connection broke after EXEC was sent) the retry asks whether the marker exists: if it does, the
batch is already in the stream and is not sent again. That is what keeps producer retries from
duplicating records.
"""

from __future__ import annotations

import itertools
import os

import redis.asyncio as aioredis

from ._keys import FIELD_DATE, FIELD_ERROR, FIELD_HOST, FIELD_RECORD, StreamKeys
from ._record import RecordEntry
from ._shipping import Shipper, ShippingSettings

__all__ = ["RedisStreamSink"]

_MARKER_TTL_S = 24 * 3600


class RedisStreamSink(Shipper):
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        keys: StreamKeys,
        owns_client: bool = False,
        shipping: ShippingSettings | None = None,
    ) -> None:
        super().__init__(shipping)
        self.redis = redis
        self.keys = keys
        self._owns_client = owns_client
        self._token = os.urandom(6).hex()
        self._batch_seq = itertools.count(1)
        self._batch_id: str | None = None  # id of the in-flight batch, kept across retries
        self._attempted = False
        self._attempt_drops = 0

    async def ship(self, batch: list[RecordEntry], *, dropped: int) -> None:
        if self._batch_id is None:
            self._batch_id = f"{self._token}-{next(self._batch_seq)}"
            self._attempted = False
            self._attempt_drops = 0
        marker = self.keys.batch_marker(self._batch_id)
        if self._attempted and await self.redis.exists(marker):
            # The earlier attempt landed, its drop count included; report only newer drops.
            self._batch_id = None
            if dropped > self._attempt_drops:
                await self.redis.hincrby(self.keys.stats, "dropped", dropped - self._attempt_drops)
            return
        self._attempted = True
        self._attempt_drops = dropped
        pipe = self.redis.pipeline(transaction=True)
        stream = self.keys.stream
        for entry in batch:
            pipe.xadd(
                stream,
                {
                    FIELD_DATE: entry.date,
                    FIELD_HOST: entry.host,
                    FIELD_ERROR: b"1" if entry.is_error else b"0",
                    FIELD_RECORD: entry.data,
                },
            )
        pipe.set(marker, b"1", ex=_MARKER_TTL_S)
        if dropped:
            pipe.hincrby(self.keys.stats, "dropped", dropped)
        await pipe.execute()
        self._batch_id = None

    async def close_sink(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
