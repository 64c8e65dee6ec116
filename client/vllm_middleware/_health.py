"""`vllm-mw health`: is the pipeline healthy, degraded (and why) or down.

Two steps, like `_partition.py`'s plan and write: `gather` reads what Redis and this machine's
spools say (I/O only, tolerant of damaged keys: what cannot be read is listed, never raised),
then `assess` turns those facts and the thresholds into a verdict (pure, tested on its own).

Down (exit 2) means nothing can flow: Redis does not answer, or (with `host`) no worker of that
host is alive. Degraded (exit 1) means records still flow or wait safely, but someone should look:
no live worker, a worker failing to write, lag, pending or the oldest unwritten record beyond
its threshold, dead letters, Redis memory near `maxmemory` (or no `maxmemory` at all: Redis then
grows until the host kills it, and the clients' spool is never used), a stranded spool, damaged
keys. Cumulative counters (dropped records, damaged spool regions) are shown, never judged: they
would keep a fixed system degraded forever.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis

from ._keys import StreamKeys
from ._sinks._spool_inventory import inventory

__all__ = ["EXIT_CODES", "Thresholds", "assess", "check_health", "gather", "redact_url"]

EXIT_CODES = {"healthy": 0, "degraded": 1, "down": 2}


@dataclass(frozen=True)
class Thresholds:
    """Beyond these the pipeline is degraded. Defaults suit a fleet of a few workers."""

    max_lag_records: int = 10_000
    max_pending_records: int = 50_000
    max_unwritten_age_s: float = 60.0
    max_dead_letters: int = 0
    max_memory_ratio: float = 0.8
    max_spool_age_s: float = 300.0
    min_workers: int = 1


@dataclass
class Facts:
    """What `gather` found. Fields stay None when they could not be read."""

    redis_url: str
    reachable: bool = False
    error: str | None = None
    used_memory: int | None = None
    maxmemory: int | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    stream_length: int | None = None
    lag: int | None = None
    lag_estimated: bool = False
    pending: int | None = None
    oldest_unwritten_age_s: float | None = None
    consumers_without_heartbeat: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: int | None = None
    counters: dict[str, int] = field(default_factory=dict)
    spools: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)


def redact_url(url: str) -> str:
    """The URL without its password, for output and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: Any) -> int | None:
    try:
        return int(_text(entry_id).split("-", 1)[0])
    except ValueError:
        return None


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _worker(key: str, raw: Any, ttl_ms: Any, now: float) -> dict[str, Any] | None:
    try:
        beat = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(beat, dict):
        return None
    last_batch = beat.get("last_batch_at")
    age = round(now - last_batch, 3) if isinstance(last_batch, int | float) else None
    return {
        "consumer": str(beat.get("consumer", key)),
        "host": beat.get("host"),
        "state": str(beat.get("state", "unknown")),
        "last_batch_at": last_batch if age is not None else None,
        "last_batch_age_s": age,
        "disk_error": beat.get("disk_error"),
        "write_failures": beat.get("write_failures"),
        "records": beat.get("records"),
        "heartbeat_expires_in_ms": ttl_ms if isinstance(ttl_ms, int) else None,
    }


def gather(
    redis_url: str,
    *,
    stream: str = "vllm:logs",
    spool_dir: str | None = None,
    timeout: float = 5.0,
) -> Facts:
    """Read everything `assess` needs. Never raises for Redis or data problems."""
    facts = Facts(redis_url=redact_url(redis_url))
    facts.spools = [s.as_dict() for s in inventory(spool_dir)]
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
        facts.reachable = True
        _read_redis(client, StreamKeys(stream), facts)
    except (redis.RedisError, OSError) as exc:
        # Unreachable, or it went away mid-check: either way nothing can be trusted to flow.
        facts.reachable = False
        facts.error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return facts


def _read_redis(client: redis.Redis, keys: StreamKeys, facts: Facts) -> None:
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    memory = client.info("memory")
    facts.used_memory = int(memory.get("used_memory", 0))
    facts.maxmemory = int(memory.get("maxmemory", 0))
    _read_heartbeats(client, keys, facts, now_ms / 1000)
    _read_stream(client, keys, facts, now_ms)
    try:
        facts.dead_letters = int(client.xlen(keys.dead_letter))
    except redis.ResponseError as exc:
        facts.damaged.append(f"{keys.dead_letter}: {exc}")
    try:
        raw = client.hgetall(keys.stats)
    except redis.ResponseError as exc:
        facts.damaged.append(f"{keys.stats}: {exc}")
        raw = {}
    for name in ("dropped", "spool_damaged", "worker_write_errors", "dead_letters"):
        try:
            facts.counters[name] = int(raw.get(name.encode(), 0))
        except ValueError:
            facts.damaged.append(f"{keys.stats} field {name}: not an integer")


def _read_heartbeats(client: redis.Redis, keys: StreamKeys, facts: Facts, now: float) -> None:
    pattern = _glob_escape(keys.heartbeat("")) + "*"
    names = sorted(_text(k) for k in client.scan_iter(match=pattern, count=1000))
    if not names:
        return
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
        pipe.pttl(name)
    replies = pipe.execute(raise_on_error=False)
    prefix = len(keys.heartbeat(""))
    for i, name in enumerate(names):
        raw, ttl = replies[2 * i], replies[2 * i + 1]
        if isinstance(raw, Exception):
            facts.damaged.append(f"{name}: {raw}")
            continue
        if raw is None:  # expired between SCAN and GET
            continue
        worker = _worker(name[prefix:], raw, ttl, now)
        if worker is None:
            facts.damaged.append(f"{name}: not a heartbeat (expected a JSON object)")
            continue
        facts.workers.append(worker)


def _read_stream(client: redis.Redis, keys: StreamKeys, facts: Facts, now_ms: int) -> None:
    try:
        facts.stream_length = int(client.xlen(keys.stream))
        groups = client.xinfo_groups(keys.stream) if facts.stream_length else []
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            facts.stream_length, facts.lag, facts.pending = 0, 0, 0
            return
        facts.damaged.append(f"{keys.stream}: {exc}")
        return
    group = next((g for g in groups if _text(g.get("name")) == keys.group), None)
    oldest: list[int] = []
    if group is None:
        # No worker ever read this stream: everything in it waits.
        facts.lag, facts.pending = facts.stream_length, 0
        first = client.xrange(keys.stream, "-", "+", count=1)
    else:
        facts.pending = int(group.get("pending") or 0)
        lag = group.get("lag")
        if lag is None:
            # Redis cannot count past deleted entries; acknowledged entries are deleted, so
            # what is left in the stream is pending or not yet delivered.
            facts.lag = max(0, facts.stream_length - facts.pending)
            facts.lag_estimated = True
        else:
            facts.lag = int(lag)
        last = _text(group.get("last-delivered-id") or "0-0")
        first = client.xrange(keys.stream, f"({last}", "+", count=1)
        if facts.pending:
            summary = client.xpending(keys.stream, keys.group)
            if (ms := _id_ms(summary.get("min"))) is not None:
                oldest.append(ms)
        _read_consumers(client, keys, facts)
    if first and (ms := _id_ms(first[0][0])) is not None:
        oldest.append(ms)
    facts.oldest_unwritten_age_s = round(max(0, now_ms - min(oldest)) / 1000, 3) if oldest else 0.0


def _read_consumers(client: redis.Redis, keys: StreamKeys, facts: Facts) -> None:
    alive = {w["consumer"] for w in facts.workers}
    for info in client.xinfo_consumers(keys.stream, keys.group):
        name = _text(info.get("name"))
        pending = int(info.get("pending") or 0)
        if name not in alive and pending:
            # A dead consumer's entries: a live worker takes them within its claim interval.
            facts.consumers_without_heartbeat.append({"consumer": name, "pending": pending})


def assess(
    facts: Facts, thresholds: Thresholds, *, host: str | None = None
) -> tuple[str, list[str]]:
    """The verdict (`healthy`, `degraded` or `down`) and the reasons for it."""
    if not facts.reachable:
        return "down", [f"Redis unreachable: {facts.error}"]
    t = thresholds
    reasons: list[str] = []
    workers = facts.workers
    if host is not None:
        workers = [w for w in workers if w["host"] == host]
        if not workers:
            return "down", [f"no live worker on host {host}"]
    if len(workers) < t.min_workers:
        reasons.append(f"{len(workers)} live workers (at least {t.min_workers} expected)")
    for worker in workers:
        if worker["state"] != "ok":
            detail = worker.get("disk_error") or worker["state"]
            reasons.append(f"worker {worker['consumer']} is {worker['state']}: {detail}")
    if facts.lag is not None and facts.lag > t.max_lag_records:
        reasons.append(f"lag {facts.lag} records > {t.max_lag_records}")
    if facts.pending is not None and facts.pending > t.max_pending_records:
        reasons.append(f"pending {facts.pending} records > {t.max_pending_records}")
    age = facts.oldest_unwritten_age_s
    if age is not None and age > t.max_unwritten_age_s:
        reasons.append(f"oldest unwritten record is {age:.1f} s old > {t.max_unwritten_age_s:g} s")
    if facts.dead_letters is not None and facts.dead_letters > t.max_dead_letters:
        reasons.append(f"{facts.dead_letters} dead letters > {t.max_dead_letters}")
    if facts.maxmemory == 0:
        reasons.append("Redis has no maxmemory: it grows until the host kills it")
    elif facts.maxmemory and facts.used_memory is not None:
        ratio = facts.used_memory / facts.maxmemory
        if ratio > t.max_memory_ratio:
            reasons.append(f"Redis memory at {ratio:.0%} of maxmemory > {t.max_memory_ratio:.0%}")
    for spool in facts.spools:
        stranded = spool.get("stranded_segments")
        if stranded and (spool.get("oldest_age_s") or 0) > t.max_spool_age_s:
            reasons.append(
                f"spool {spool['path']}: {stranded} stranded segments "
                f"({spool['bytes']} bytes) older than {t.max_spool_age_s:g} s"
            )
    reasons += [f"damaged: {item}" for item in facts.damaged]
    return ("degraded" if reasons else "healthy"), reasons


def check_health(
    redis_url: str,
    *,
    stream: str = "vllm:logs",
    thresholds: Thresholds | None = None,
    host: str | None = None,
    spool_dir: str | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """The whole report: `status`, `reasons`, and what it was based on (JSON-ready)."""
    started = time.monotonic()
    facts = gather(redis_url, stream=stream, spool_dir=spool_dir, timeout=timeout)
    status, reasons = assess(facts, thresholds or Thresholds(), host=host)
    report: dict[str, Any] = {"status": status, "reasons": reasons}
    report.update(asdict(facts))
    report["checked_in_s"] = round(time.monotonic() - started, 3)
    return report
