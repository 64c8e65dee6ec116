"""An idle Redis shipper with its spool (the default) sleeps without its flush timer.

Behind a busy app loop every wake of the shipping thread costs GIL races; a shared sink the
clients let go of stays open for the next one, so a timer every `flush_interval` charged that
cost to the app for as long as the sink lingered. It still ships, and reports sampled-out
calls, as soon as there is something to send.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from vllm_middleware._sinks._destination import redis_shipper
from vllm_middleware._sinks._shipping_settings import ShippingSettings
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess

KEYS = StreamKeys("idle:logs")


def entry(i: int) -> RecordEntry:
    return RecordEntry("2026-01-02", "idle", False, b'{"request_id":"i%d"}' % i)


async def test_idle_spooling_shipper_does_not_wake_per_interval(
    redis_server: RedisServerProcess,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    shipper = redis_shipper(
        client, keys=KEYS, owns_client=True, shipping=ShippingSettings(flush_interval=0.02)
    )
    flushes = 0
    flush_once = shipper._flush_once

    async def counted() -> bool:
        nonlocal flushes
        flushes += 1
        return await flush_once()

    shipper._flush_once = counted  # type: ignore[method-assign]
    try:
        shipper.submit(entry(0))
        assert await shipper.wait_durable(5)
        await asyncio.sleep(0.3)  # let the first adoption pass and the loop settle
        before = flushes
        await asyncio.sleep(0.5)  # 25 flush intervals
        assert flushes - before <= 1, f"{flushes - before} flushes while idle"

        # A record still goes out within about a flush interval, and so do counts alone.
        shipper.submit(entry(1))
        assert await shipper.wait_durable(5)
        assert shipper.counters.shipped == 2
        shipper.count_sampled_out(3)
        check = aioredis.Redis.from_url(redis_server.url)
        try:
            for _ in range(100):
                await asyncio.sleep(0.02)
                if int(await check.hget(KEYS.stats, "sampled_out") or 0) == 3:
                    break
            assert int(await check.hget(KEYS.stats, "sampled_out") or 0) == 3
        finally:
            await check.aclose()
    finally:
        await shipper.aclose(5)
