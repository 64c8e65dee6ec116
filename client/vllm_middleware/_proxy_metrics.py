"""The logging proxy's Prometheus `/metrics`.

Two views, each cheap on the request path: the client-side metrics every door can export
(`ClientMetrics`: request duration, time to first token, requests by model and status, tokens),
observed from each record as the recorder builds it; and the proxy's own counters (in flight,
client disconnects, upstream failures), plain integers read only when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ._client_metrics import ClientMetrics
from ._exceptions import ConfigurationError
from ._proxy import ProxyCounters

__all__ = ["ProxyMetrics"]


class _CountersCollector:
    def __init__(self, counters: ProxyCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.counters
        yield CounterMetricFamily(
            "vllm_mw_proxy_requests", "Requests the proxy received", value=c.requests
        )
        yield GaugeMetricFamily(
            "vllm_mw_proxy_requests_in_flight", "Requests being forwarded now", value=c.in_flight
        )
        yield CounterMetricFamily(
            "vllm_mw_proxy_client_disconnects",
            "Clients gone before their response was complete (the upstream request cancelled)",
            value=c.client_disconnects,
        )
        failures = CounterMetricFamily(
            "vllm_mw_proxy_upstream_failures",
            "Upstream requests that failed, by reason",
            labels=["reason"],
        )
        failures.add_metric(["unreachable"], c.upstream_unreachable)
        failures.add_metric(["timeout"], c.upstream_timeouts)
        failures.add_metric(["cut"], c.upstream_cut)
        yield failures
        yield CounterMetricFamily(
            "vllm_mw_proxy_unknown_model",
            "Requests for a model no upstream serves (answered 404)",
            value=c.unknown_model,
        )


class ProxyMetrics:
    """A registry of the proxy's metrics; `observe` goes on the recorder, `render` serves."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise ConfigurationError(
                "the proxy's /metrics needs prometheus-client: "
                "pip install 'vllm-middleware[proxy]' (or --no-metrics)"
            ) from None
        self.registry = CollectorRegistry(auto_describe=False)
        self.client = ClientMetrics(self.registry)

    @property
    def observe(self) -> Callable[[Any], None]:
        return self.client.observe

    def watch(self, counters: ProxyCounters) -> None:
        self.registry.register(_CountersCollector(counters))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
