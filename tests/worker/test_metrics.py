"""The worker's Prometheus `/metrics`, scraped over HTTP from a real worker process."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import redis as redis_sync
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from vllm_middleware import APIStatusError, ClientMetrics, VLLMMiddleware, load_logs
from vllm_middleware.storage import StreamKeys
from vllm_middleware_testing import FakeVLLMServer, RedisServerProcess

from ..conftest import WorkerFactory, wait_for
from .test_health import add_records

KEYS = StreamKeys()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Every sample as `name{label="v",...}` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_worker_serves_metrics_after_writing(
    tmp_path: Path, redis_server: RedisServerProcess, start_worker: WorkerFactory
) -> None:
    port = free_port()
    start_worker(redis_server.url, tmp_path / "logs", "w-metrics", "--metrics-port", str(port))

    def serving() -> bool:
        try:
            return "vllm_mw_batches_total" in scrape(port)
        except OSError:
            return False

    wait_for(serving)
    before = scrape(port)
    assert before["vllm_mw_records_written_total"] == 0
    add_records(redis_server.url, 40, host="app-1")
    add_records(redis_server.url, 20, host="app-2")
    wait_for(lambda: scrape(port)["vllm_mw_records_written_total"] == 60)
    after = scrape(port)
    files = list((tmp_path / "logs").rglob("*.jsonl"))
    assert after["vllm_mw_bytes_written_total"] == sum(p.stat().st_size for p in files) > 0
    assert after["vllm_mw_batches_total"] >= 1
    assert after["vllm_mw_batch_seconds_count"] == after["vllm_mw_batches_total"]
    assert after["vllm_mw_batch_seconds_sum"] > 0
    assert after["vllm_mw_files_open"] == 2  # one per partition written
    assert after['vllm_mw_write_errors_total{reason="disk"}'] == 0
    assert after["vllm_mw_records_dead_lettered_total"] == 0
    assert after["vllm_mw_stream_lag_records"] == 0
    assert after["vllm_mw_stream_pending_records"] == 0
    assert after["vllm_mw_oldest_unwritten_age_seconds"] == 0
    # No label carries a value that grows with traffic (request ids, consumers, hosts).
    labelled = {name.split("{")[0] for name in after if "{" in name}
    assert labelled <= {"vllm_mw_write_errors_total", "vllm_mw_batch_seconds_bucket"}


def test_dead_letters_and_backlog_show_up(
    tmp_path: Path, redis_server: RedisServerProcess, start_worker: WorkerFactory
) -> None:
    client = redis_sync.Redis.from_url(redis_server.url)
    client.xgroup_create(KEYS.stream, KEYS.group, id="0", mkstream=True)
    # An entry without the partition fields is dead-lettered, never written.
    client.xadd(KEYS.stream, {b"garbage": b"1"})
    # Entries taken by a consumer that died stay pending until the worker recovers them.
    add_records(redis_server.url, 5)
    client.xreadgroup(KEYS.group, "gone", {KEYS.stream: ">"}, count=100)
    client.close()
    port = free_port()
    start_worker(redis_server.url, tmp_path / "logs", "w-m2", "--metrics-port", str(port))

    def settled() -> bool:
        try:
            samples = scrape(port)
        except OSError:
            return False
        return samples["vllm_mw_records_written_total"] == 5

    wait_for(settled)
    wait_for(lambda: scrape(port)["vllm_mw_stream_pending_records"] == 0)
    samples = scrape(port)
    assert samples["vllm_mw_records_dead_lettered_total"] == 1


async def test_client_metrics_opt_in_in_process(tmp_path: Path, fake_vllm: FakeVLLMServer) -> None:
    """Apps opt in with a registry of their choice; calls are counted as the client saw them."""
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry, max_models=2)
    async with VLLMMiddleware(base_url=fake_vllm.base_url, log_dir=tmp_path) as client:
        assert client.record_observer is None  # off by default
        metrics.attach(client)
        messages = [{"role": "user", "content": "hi"}]
        for _ in range(3):
            await client.chat_completion(messages)
        async with await client.chat_completion(messages, stream=True) as stream:
            async for _chunk in stream:
                pass
        for name in ("m-a", "m-b", "m-c"):  # unknown models: 404s, and a bounded label set
            with pytest.raises(APIStatusError):
                await client.chat_completion(messages, model=name)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }
    model = load_logs(tmp_path)[0].model
    ok = ("vllm_mw_requests_total", (("model", model), ("status", "200")))
    assert samples[ok] == 4
    assert samples[("vllm_mw_request_duration_seconds_count", (("model", model),))] == 4
    assert samples[("vllm_mw_time_to_first_token_seconds_count", (("model", model),))] == 1
    prompt = sum(r.usage["prompt_tokens"] for r in load_logs(tmp_path) if r.usage)
    assert samples[("vllm_mw_tokens_total", (("kind", "prompt"), ("model", model)))] == prompt
    statuses = {k[1] for k in samples if k[0] == "vllm_mw_requests_total"}
    models = {dict(labels)["model"] for labels in statuses}
    assert models == {model, "m-a", "other"}  # max_models=2: the rest is "other"


def test_client_metrics_never_raise() -> None:
    metrics = ClientMetrics(CollectorRegistry())
    metrics.observe(
        {"model": ["not", "a", "name"], "latency_ms": "x", "usage": {"prompt_tokens": "3"}}
    )
    metrics.observe({})
    samples = {s.name: s.value for f in metrics.requests.collect() for s in f.samples}
    assert samples["vllm_mw_requests_total"] == 2
