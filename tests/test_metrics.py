"""The worker's Prometheus `/metrics`, scraped over HTTP from a real worker process."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families
from vllm_middleware import StreamKeys
from vllm_middleware.testing import RedisServerProcess

from .conftest import WorkerFactory, wait_for
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
    # An entry without the partition fields is poison: dead-lettered, never written.
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
