"""Prometheus `/metrics` for a worker (`--metrics-port`, `VLLM_MW_METRICS_PORT`).

Nothing is added to the batch path but one histogram observation per batch: the counters are
the consumer's own `ConsumerStatus`, read when Prometheus scrapes, and the stream gauges (lag,
pending, age of the oldest unwritten record) are read from Redis at scrape time too, by the
exporter's HTTP thread with its own short-timeout client, so a slow Redis slows the scrape,
never the consumer. Names follow Prometheus conventions: base units (seconds, bytes) in the
name, `_total` counters, no label whose values grow with traffic.

The client-side view (request duration, time to first token, requests by model and status,
tokens) is not exported here: it would mean parsing every record on the worker's fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import redis
from vllm_middleware import ConfigurationError

from ._config import WorkerConfig

if TYPE_CHECKING:
    from ._consumer import StreamConsumer

__all__ = ["MetricsServer", "start_metrics_server"]

logger = logging.getLogger("vllm_middleware_worker")

# Batch durations (write + fsync + acknowledgement): a few ms on a quiet disk to seconds when
# the disk or Redis struggles.
_BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# ConsumerStatus.errors_by_kind -> the `reason` label of vllm_mw_write_errors_total
_REASONS = {"write": "disk", "redis": "redis", "ack": "redis_ack"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_seconds(entry_id: Any) -> float | None:
    try:
        return int(_text(entry_id).split("-", 1)[0]) / 1000
    except ValueError:
        return None


class _Backlog(NamedTuple):
    lag: int  # entries not yet delivered to a worker
    pending: int  # delivered, not acknowledged
    oldest_age_s: float  # age of the oldest entry not yet written


class _StreamBacklog:
    """lag, pending and the oldest unwritten record's age, read with a blocking client."""

    def __init__(self, config: WorkerConfig) -> None:
        from vllm_middleware.storage import StreamKeys

        self.keys = StreamKeys(config.stream)
        self.client = redis.Redis.from_url(
            config.redis_url, socket_timeout=2, socket_connect_timeout=2
        )

    def read(self) -> _Backlog | None:
        keys = self.keys
        try:
            seconds, micros = self.client.time()
            now = seconds + micros / 1e6
            groups = self.client.xinfo_groups(keys.stream)
            group = next((g for g in groups if _text(g.get("name")) == keys.group), None)
            if group is None:
                return None
            pending = int(group.get("pending") or 0)
            lag = group.get("lag")
            if lag is None:  # Redis cannot count past deleted entries: length - pending
                lag = max(0, int(self.client.xlen(keys.stream)) - pending)
            oldest: list[float] = []
            last = _text(group.get("last-delivered-id") or "0-0")
            first = self.client.xrange(keys.stream, f"({last}", "+", count=1)
            if first and (at := _id_seconds(first[0][0])) is not None:
                oldest.append(at)
            if pending:
                summary = self.client.xpending(keys.stream, keys.group)
                if (at := _id_seconds(summary.get("min"))) is not None:
                    oldest.append(at)
            age = max(0.0, now - min(oldest)) if oldest else 0.0
            return _Backlog(int(lag), pending, age)
        except (redis.RedisError, OSError) as exc:
            logger.debug("metrics: could not read the stream backlog: %s", exc)
            return None

    def close(self) -> None:
        self.client.close()


class _ConsumerCollector:
    """Reads the consumer's counters at scrape time (nothing on the batch path)."""

    def __init__(self, consumer: StreamConsumer, backlog: _StreamBacklog) -> None:
        self.consumer = consumer
        self.backlog = backlog

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.consumer.status
        counters = [
            ("vllm_mw_records_written", "Records written to the log files", status.records),
            ("vllm_mw_records_dead_lettered", "Records sent to dead letters", status.dead_letters),
            ("vllm_mw_batches", "Batches written and acknowledged", status.batches),
            ("vllm_mw_bytes_written", "Bytes appended to the log files", status.bytes),
        ]
        for name, doc, count in counters:
            yield CounterMetricFamily(name, doc, value=count)
        errors = CounterMetricFamily(
            "vllm_mw_write_errors",
            "Failed attempts (retried) to write or acknowledge a batch, by reason",
            labels=["reason"],
        )
        for kind, reason in _REASONS.items():
            errors.add_metric([reason], status.errors_by_kind.get(kind, 0))
        yield errors
        consumer = self.consumer
        gauges: list[tuple[str, str, float]] = [
            ("vllm_mw_files_open", "Log files this worker holds open", consumer.writer.open_files),
            ("vllm_mw_disk_error", "1 while writes fail", float(consumer.disk_error is not None)),
        ]
        backlog = self.backlog.read()
        if backlog is not None:
            lag, pending, age = backlog.lag, backlog.pending, backlog.oldest_age_s
            gauges += [
                ("vllm_mw_stream_lag_records", "Entries not yet delivered to a worker", lag),
                ("vllm_mw_stream_pending_records", "Entries delivered, not acknowledged", pending),
                ("vllm_mw_oldest_unwritten_age_seconds", "Age of the oldest unwritten record", age),
            ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


class MetricsServer:
    """The registry and HTTP server of one worker; `close` stops both."""

    def __init__(self, consumer: StreamConsumer, config: WorkerConfig) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram, start_http_server
        except ImportError:
            raise ConfigurationError(
                "metrics need prometheus-client: pip install 'vllm-middleware[worker]'"
            ) from None
        self.registry = CollectorRegistry(auto_describe=False)
        self._backlog = _StreamBacklog(config)
        self.registry.register(_ConsumerCollector(consumer, self._backlog))
        batch_seconds = Histogram(
            "vllm_mw_batch_seconds",
            "Seconds from the start of a batch's write to its acknowledgement",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        consumer.batch_observer = batch_seconds.observe
        self._server, self._thread = start_http_server(
            config.metrics_port, addr=config.metrics_addr, registry=self.registry
        )
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._backlog.close()


def start_metrics_server(consumer: StreamConsumer, config: WorkerConfig) -> MetricsServer | None:
    """Serve `/metrics` when `config.metrics_port` is set (0, the default, serves nothing)."""
    if not config.metrics_port:
        return None
    server = MetricsServer(consumer, config)
    logger.info("serving Prometheus metrics on %s:%d", config.metrics_addr, server.port)
    return server
