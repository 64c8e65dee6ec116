"""The spool as a wrapper: `SpoolingSink` around a `RedisStreamSink`, driven through the sink
interface alone (`ship`, `report_counts`, `aclose`) and its `Backlog` capability, as the
shipper drives it, against a real redis-server that is SIGKILLed and restarted, and hung."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from vllm_middleware._sinks._destination import redis_shipper
from vllm_middleware._sinks._redis_sink import RedisStreamSink
from vllm_middleware._sinks._shipping_settings import ShippingSettings, Tally, Unreported
from vllm_middleware._sinks._sink import Backlog, Sink
from vllm_middleware._sinks._spooling_sink import RedisUnavailable, SpoolingSink
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess

KEYS = StreamKeys("seam:logs")
NO_COUNTS = Unreported(0, 0)


def entries(start: int, count: int) -> list[RecordEntry]:
    return [
        RecordEntry("2026-01-02", "seam", False, b'{"request_id":"s%d"}' % i)
        for i in range(start, start + count)
    ]


def make_sink(url: str, spool_dir: Path) -> SpoolingSink:
    settings = ShippingSettings(
        batch_size=10, spool_dir=str(spool_dir), redis_timeout=0.5, retry_backoff=(0.05, 0.2)
    )
    client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    redis_sink = RedisStreamSink(client, keys=KEYS, owns_client=True, timeout=0.5)
    return SpoolingSink(redis_sink, settings, Tally())


async def until(condition: Callable[[], bool], seconds: float) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def replay_all(sink: SpoolingSink) -> None:
    """What the shipper does between live batches, until the backlog is gone."""
    await until(lambda: sink.healthy, 20)  # the probe's PING answered
    await sink.work_backlog()  # (opens the spool and adopts on its first call)
    for _ in range(1000):
        if not sink.has_backlog():
            return
        await sink.work_backlog()
    raise AssertionError("backlog not replayed")


async def stream_and_stats(url: str) -> tuple[list[bytes], dict[bytes, bytes]]:
    check = aioredis.Redis.from_url(url)
    rows = await check.xrange(KEYS.stream)
    stats = await check.hgetall(KEYS.stats)
    await check.aclose()
    return [line for _, fields in rows for line in fields[b"rec"].split(b"\n")], stats


async def test_spooled_while_redis_is_killed_and_replayed_once_after_restart(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    sink = make_sink(redis_server.url, tmp_path / "spool")
    assert isinstance(sink, Backlog)
    as_sink: Sink = sink  # the interface the shipper holds
    await as_sink.ship(entries(0, 10), dropped=3, sampled_out=1)

    redis_server.kill()
    with pytest.raises(Exception):  # noqa: B017 - refused or timed out
        await as_sink.ship(entries(10, 10), dropped=0, sampled_out=0)
    assert await sink.keep(entries(10, 10), NO_COUNTS)
    assert sink.healthy is False
    assert sink.take_limit(10) > 10  # spool writes take bigger batches
    # Redis is not tried again while it is away: straight to the spool.
    with pytest.raises(RedisUnavailable):
        await as_sink.ship(entries(20, 25), dropped=0, sampled_out=0)
    assert await sink.keep(entries(20, 25), NO_COUNTS)
    await as_sink.report_counts(2, 5)  # owed, never raised while Redis is away
    assert sink.counters.spooled == 35 and not sink.has_backlog()

    redis_server.start()
    await replay_all(sink)
    await as_sink.report_counts(0, 0)  # sends what is owed
    await as_sink.report_counts(0, 0)  # (nothing owed: sends nothing)
    assert sink.counters.replayed == 35
    records, stats = await stream_and_stats(redis_server.url)
    assert sorted(records) == sorted(e.data for e in entries(0, 45))
    assert stats[b"dropped"] == b"5" and stats[b"sampled_out"] == b"6"
    await as_sink.aclose()
    assert not list((tmp_path / "spool").rglob("*.seg"))


async def test_a_flush_that_landed_while_redis_hung_is_not_replayed_twice(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """Redis hangs after taking the call: the sink times out and spools the batch under the
    id it sent it with; Redis then runs it. The replay finds its marker and skips it."""
    sink = make_sink(redis_server.url, tmp_path / "spool")
    await sink.ship(entries(0, 1), dropped=0, sampled_out=0)  # connected, script loaded
    redis_server.pause()
    try:
        with pytest.raises(Exception):  # noqa: B017 - timed out
            await sink.ship(entries(1, 20), dropped=4, sampled_out=0)
        assert await sink.keep(entries(1, 20), Unreported(4, 0))
    finally:
        redis_server.resume()
    await replay_all(sink)
    await sink.report_counts(0, 0)
    records, stats = await stream_and_stats(redis_server.url)
    assert sorted(records) == sorted(e.data for e in entries(0, 21))  # each exactly once
    assert stats[b"dropped"] == b"4"  # with the flush that landed, or with the replay
    await sink.aclose()


async def test_close_with_redis_down_leaves_the_spool_for_the_next_process(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    sink = make_sink(redis_server.url, tmp_path / "spool")
    redis_server.kill()
    assert await sink.keep(entries(0, 30), NO_COUNTS)  # what a shipper hands over at close
    await sink.aclose()
    assert list((tmp_path / "spool").rglob("*.seg"))

    redis_server.start()
    successor = make_sink(redis_server.url, tmp_path / "spool")
    await successor.work_backlog()  # adopts the closed sink's segments
    await replay_all(successor)
    await successor.aclose()
    records, _ = await stream_and_stats(redis_server.url)
    assert sorted(records) == sorted(e.data for e in entries(0, 30))


async def test_counts_of_a_flush_that_landed_while_redis_hung_reach_redis_once(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """The drop count rides on a batch whose flush times out yet lands (Redis hung, then
    ran it): the batch is spooled and skipped on replay, and its counts are not sent again."""
    settings = ShippingSettings(
        batch_size=10, spool_dir=str(tmp_path / "spool"), redis_timeout=0.5,
        retry_backoff=(0.05, 0.2),
    )  # fmt: skip
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    shipper = redis_shipper(client, keys=KEYS, owns_client=True, shipping=settings)
    for entry in entries(0, 10):
        shipper.submit(entry)
    assert await shipper.wait_durable(30)
    redis_server.pause()
    try:
        shipper.count_dropped(4, "test")  # carried by the next batch
        shipper.count_sampled_out(3)
        for entry in entries(10, 10):
            shipper.submit(entry)
        assert await shipper.wait_durable(30)  # timed out, spooled
        assert shipper.counters.spooled == 10
    finally:
        redis_server.resume()
    for entry in entries(20, 10):
        shipper.submit(entry)
    counters = shipper.counters  # (a loaded machine may time out and spool more)
    await until(lambda: counters.replayed == counters.spooled and not shipper.buffered, 30)
    await shipper.aclose()
    records, stats = await stream_and_stats(redis_server.url)
    assert sorted(records) == sorted(e.data for e in entries(0, 30))
    assert stats[b"dropped"] == b"4" and stats[b"sampled_out"] == b"3"
