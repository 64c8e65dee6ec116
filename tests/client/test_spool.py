"""The client's on-disk spool: framing, damage, size bound, ownership, replay without duplicates."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from vllm_middleware import VLLMMiddleware
from vllm_middleware._sinks._destination import redis_shipper
from vllm_middleware._sinks._shipping import Shipper, ShippingSettings
from vllm_middleware._sinks._spool import Spool
from vllm_middleware._sinks._spooling_sink import SpoolingSink
from vllm_middleware.storage import RecordEntry, StreamKeys
from vllm_middleware_testing import RedisServerProcess

KEYS = StreamKeys()


def entry(i: int) -> RecordEntry:
    return RecordEntry("2026-01-02", "h", i % 7 == 0, b'{"request_id":"r%d"}' % i)


def batch(start: int, count: int) -> list[RecordEntry]:
    return [entry(i) for i in range(start, start + count)]


async def close_when(sink: Shipper, done: Callable[[], bool], seconds: float) -> None:
    """Let the sink run (replaying) until `done()` or `seconds` pass, then close it."""
    for _ in range(int(seconds / 0.05)):
        if done():
            break
        await asyncio.sleep(0.05)
    await sink.aclose()


async def stream_records(url: str) -> list[bytes]:
    check = aioredis.Redis.from_url(url)
    rows = await check.xrange(KEYS.stream)
    await check.aclose()
    # An entry is a bundle of records joined by newlines (`_keys.py`).
    return [line for _, fields in rows for line in fields[b"rec"].split(b"\n")]


def drain(spool: Spool) -> list[tuple[str, int, bool, list[bytes]]]:
    groups = []
    while (group := spool.next_group()) is not None:
        groups.append(
            (group.batch_id, group.first_index, group.complete, [e.data for e in group.entries])
        )
        spool.commit(group)
    return groups


def test_batches_come_back_in_order_and_segments_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**7, segment_bytes=2000)
    for n in range(5):
        assert spool.append(f"b{n}", batch(n * 10, 10))
    assert len(list(tmp_path.glob("*.seg"))) > 1  # rotated
    groups = drain(spool)
    assert [g[0] for g in groups] == [f"b{n}" for n in range(5)]
    assert all(g[2] for g in groups)
    assert [d for g in groups for d in g[3]] == [e.data for e in batch(0, 50)]
    assert not spool and list(tmp_path.glob("*.seg")) == []
    restored = RecordEntry("2026-01-02", "h", True, b'{"request_id":"r0"}')
    spool.append("x", [restored])
    group = spool.next_group()
    assert group is not None and group.entries == [restored]
    spool.close()


def test_corruption_and_torn_tail_lose_only_the_damaged_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**7)
    spool.append("a", batch(0, 10))
    spool.append("b", batch(10, 10))
    spool.close()
    (path,) = tmp_path.glob("*.seg")
    data = bytearray(path.read_bytes())
    frame = len(data) // 20
    data[frame * 4 + 20] ^= 0xFF  # flip a byte inside record 4
    path.write_bytes(bytes(data[: len(data) - 7]))  # and tear the last record
    spool = Spool(tmp_path, max_bytes=10**7)
    assert spool.adopt_orphans() == 1
    groups = drain(spool)
    got = [d for g in groups for d in g[3]]
    assert got == [e.data for e in batch(0, 20) if e.data not in (b'{"request_id":"r4"}',)][:-1]
    # Batch "a" was split by the damage: both parts replay under their own part markers.
    assert [(g[0], g[1], g[2]) for g in groups] == [
        ("a", 0, False),
        ("a", 5, False),
        ("b", 0, False),
    ]
    assert spool.damaged_regions == 2 and spool.damaged_bytes > 0
    spool.close()


def test_size_bound_refuses_instead_of_growing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=3000)
    accepted = [spool.append(f"b{n}", batch(n * 10, 10)) for n in range(20)]
    assert True in accepted and False in accepted
    assert spool.nbytes <= 3000
    spool.close()


def test_live_owner_keeps_its_segments_dead_owner_loses_them(tmp_path: Path) -> None:
    owner = Spool(tmp_path, max_bytes=10**7)
    owner.append("mine", batch(0, 3))
    other = Spool(tmp_path, max_bytes=10**7)
    assert other.adopt_orphans() == 0  # locked by a live process (here: another open file)
    # A process that spools and is SIGKILLed: its segment becomes adoptable.
    script = textwrap.dedent(
        f"""
        import os, signal
        from vllm_middleware.storage import RecordEntry
        from vllm_middleware._sinks._spool import Spool
        s = Spool({str(tmp_path)!r}, max_bytes=10**7)
        s.append("dead", [RecordEntry("2026-01-02", "h", False, b'{{"request_id":"d"}}')])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=False)
    assert other.adopt_orphans() == 1
    assert [g[0] for g in drain(other)] == ["dead"]
    assert [g[0] for g in drain(owner)] == ["mine"]
    owner.close()
    other.close()


async def test_sink_spools_while_redis_is_down_and_replays_once(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1)
    settings = ShippingSettings(
        batch_size=50, spool_dir=str(tmp_path / "spool"), redis_timeout=0.5,
        retry_backoff=(0.05, 0.2),
    )  # fmt: skip
    sink = redis_shipper(client, keys=KEYS, owns_client=True, shipping=settings)
    for i in range(100):
        sink.submit(entry(i))
    assert await sink.wait_durable(5)
    redis_server.stop()
    for i in range(100, 400):
        sink.submit(entry(i))
    assert await sink.wait_durable(10)  # durable in the spool, with Redis down
    assert sink.counters.spooled >= 300 and not sink.healthy
    redis_server.start()
    for i in range(400, 500):
        sink.submit(entry(i))
    counters = sink.counters
    await close_when(sink, lambda: counters.replayed == counters.spooled and not sink.buffered, 10)
    ids = await stream_records(redis_server.url)
    assert len(ids) == len(set(ids)) == 500
    assert not list((tmp_path / "spool").rglob("*.seg"))


async def test_replay_skips_a_batch_whose_flush_had_landed(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """The ambiguous case: EXEC ran, the reply was lost, the batch was spooled anyway."""
    client = aioredis.Redis.from_url(redis_server.url)
    settings = ShippingSettings(spool_dir=str(tmp_path / "spool"))
    sink = redis_shipper(client, keys=KEYS, owns_client=True, shipping=settings)
    await sink.sink.redis_sink.send(batch(0, 5), "landed")
    spool = Spool(sink.sink.spool_directory(), max_bytes=10**7)
    spool.append("landed", batch(0, 5))
    spool.append("lost", batch(5, 5))
    spool.close()  # as if its process had died
    sink.submit(entry(10))
    await close_when(sink, lambda: sink.counters.replayed == 10, 5)
    assert sorted(await stream_records(redis_server.url)) == sorted(e.data for e in batch(0, 11))


@pytest.mark.parametrize("fsync", [True, False])
def test_unframeable_batch_is_refused_whole(tmp_path: Path, fsync: bool) -> None:
    spool = Spool(tmp_path, max_bytes=10**7, fsync=fsync)
    spool.append("ok", batch(0, 2))
    size = spool.nbytes
    bad = RecordEntry("2026-01-02", "h" * 70_000, False, b"{}")  # host too long to frame
    with pytest.raises(Exception):  # noqa: B017 - struct.error
        spool.append("bad", [bad])
    assert spool.nbytes == size and [g[0] for g in drain(spool)] == ["ok"]
    spool.close()


async def test_damage_is_replayed_around_and_reported_to_redis(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    settings = ShippingSettings(spool_dir=str(tmp_path / "spool"))
    sink = redis_shipper(client, keys=KEYS, owns_client=True, shipping=settings)
    spool = Spool(sink.sink.spool_directory(), max_bytes=10**7)
    spool.append("a", batch(0, 10))
    spool.close()
    (path,) = sink.sink.spool_directory().glob("*.seg")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    sink.submit(entry(100))
    await close_when(sink, lambda: sink.counters.replayed == 9, 5)
    assert len(await stream_records(redis_server.url)) == 10  # 9 whole spooled + the live one
    check = aioredis.Redis.from_url(redis_server.url)
    assert await check.hget(KEYS.stats, "spool_damaged") == b"1"
    await check.aclose()


async def test_close_is_bounded_with_redis_hung_and_spools_the_rest(
    redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    import time

    settings = ShippingSettings(spool_dir=str(tmp_path / "spool"), redis_timeout=1.0)
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=30)
    sink = redis_shipper(client, keys=KEYS, owns_client=True, shipping=settings)
    redis_server.pause()  # accepts connections, never answers
    try:
        for i in range(5000):
            sink.submit(entry(i))
        started = time.monotonic()
        await sink.aclose(timeout=3.0)
        assert time.monotonic() - started < 3.5
        assert sink.counters.dropped == 0 and sink.counters.spooled == 5000
    finally:
        redis_server.resume()
    # The next process replays what the closed one left in the spool.
    client = aioredis.Redis.from_url(redis_server.url)
    sink = redis_shipper(client, keys=KEYS, owns_client=True, shipping=settings)
    sink.submit(entry(5000))
    await close_when(sink, lambda: sink.counters.replayed == 5000, 10)
    assert sorted(await stream_records(redis_server.url)) == sorted(e.data for e in batch(0, 5001))


async def test_close_waits_for_the_spool_replay_step_it_started(
    redis_server: RedisServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's close (on a sink other clients may share) used to return between a replay
    step's commit in the spool and its records being counted as replayed."""
    reply = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, json=reply))
    )
    redis_server.stop()
    client = VLLMMiddleware(http_client=http, redis_url=redis_server.url, log_dir=tmp_path)
    sink = client._sink
    assert sink is not None and isinstance(sink.sink, SpoolingSink)
    for _ in range(20):
        await client.chat_completion([{"role": "user", "content": "hi"}], model="m")
    for _ in range(500):
        if sink.counters.spooled == 20:
            break
        await asyncio.sleep(0.02)
    assert sink.counters.spooled == 20
    commit = Spool.commit

    def slow_commit(self: Spool, group: object) -> None:
        commit(self, group)  # type: ignore[arg-type]
        time.sleep(0.3)  # the step has committed; its count comes after this returns

    monkeypatch.setattr(Spool, "commit", slow_commit)
    redis_server.start()
    await client.close()
    assert sink.counters.replayed == 20
    await http.aclose()
