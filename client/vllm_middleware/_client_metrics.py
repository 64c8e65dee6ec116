"""Client-side Prometheus metrics in the app's own process (opt-in).

What vLLM's own metrics cannot see: the duration as the app saw it (network and queueing
included), time to first token, outcomes by model and HTTP status, tokens by model. Observed
from each record as it is built, before it is encoded (a few dict lookups; no parsing); off
unless an app asks for it:

    metrics = ClientMetrics(registry)          # a prometheus_client registry of your choice
    metrics.attach(client)                     # VLLMMiddleware

Labels stay bounded: the model (at most `max_models` distinct names, then "other"), the status
code (or "none" when no response arrived) and the token kind. Never request or user ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ClientMetrics"]

# Seconds: chat calls take from tens of milliseconds to minutes (long generations).
_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_OTHER = "other"


class ClientMetrics:
    """The client-side view as Prometheus metrics in `registry` (default: the global one)."""

    def __init__(self, registry: Any = None, *, max_models: int = 50) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Histogram
        except ImportError:
            from ._exceptions import ConfigurationError

            raise ConfigurationError(
                "client metrics need prometheus-client: pip install prometheus-client"
            ) from None
        registry = REGISTRY if registry is None else registry
        self.max_models = max_models
        self._models: set[str] = set()
        self.duration = Histogram(
            "vllm_mw_request_duration_seconds",
            "Call duration as the client saw it (network and queueing included)",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "vllm_mw_time_to_first_token_seconds",
            "Time to the first streamed token as the client saw it",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "vllm_mw_requests",
            "Calls by model and HTTP status (none: no response)",
            ["model", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "vllm_mw_tokens", "Tokens by model and kind", ["model", "kind"], registry=registry
        )

    def attach(self, client: Any) -> ClientMetrics:
        """Observe every record `client` (a `VLLMMiddleware`) builds from now on."""
        client.record_observer = self.observe
        return self

    def _model(self, raw: Any) -> str:
        name = raw if isinstance(raw, str) else "none"
        if name in self._models:
            return name
        if len(self._models) >= self.max_models:
            return _OTHER
        self._models.add(name)
        return name

    def observe(self, record: Mapping[str, Any]) -> None:
        """Count one record. Never raises: a metrics problem must not cost the record."""
        try:
            model = self._model(record.get("model"))
            status = record.get("status_code")
            self.requests.labels(model, str(status) if status is not None else "none").inc()
            latency_ms = record.get("latency_ms")
            if isinstance(latency_ms, int | float):
                self.duration.labels(model).observe(latency_ms / 1000)
            ttft_ms = record.get("ttft_ms")
            if isinstance(ttft_ms, int | float):
                self.ttft.labels(model).observe(ttft_ms / 1000)
            usage = record.get("usage")
            if isinstance(usage, Mapping):
                for kind in ("prompt", "completion"):
                    count = usage.get(f"{kind}_tokens")
                    if isinstance(count, int) and count > 0:
                        self.tokens.labels(model, kind).inc(count)
        except Exception:  # best effort: a metrics problem is never the caller's
            pass
