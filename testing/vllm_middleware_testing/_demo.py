"""`vllm-mw demo`: the whole pipeline on one machine, shown end to end.

It lives beside the test doubles it starts, so the client and the worker never import them;
`vllm-mw` looks it up at run time.

Starts what is missing: a FAKE vLLM server unless `--base-url` names a real one, a private
redis-server and worker processes when redis-server is installed (otherwise the embedded
mode), sends a mix of requests from two app "hosts", then prints the statistics, the partition
tree and sample records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_middleware import APIError, VLLMMiddleware, get_statistics, iter_log_files, load_logs

from ._fake_vllm import FakeVLLMServer
from ._redis_server import RedisServerProcess

__all__ = ["add_arguments", "run"]

_DEFAULT_DIR = "./logs/demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="a real vLLM server, e.g. http://localhost:8081/v1")
    parser.add_argument("--model", default=None, help="model name (default: the server's)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--embedded", action="store_true", help="force the embedded mode")
    parser.add_argument(
        "--log-dir",
        default=None,
        help=f"where the records go (default {_DEFAULT_DIR}, emptied at each demo run)",
    )
    parser.add_argument("--requests", type=int, default=200, help="requests to send")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (Redis mode)")


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _traffic(base_url: str, model: str | None, count: int, **client_args: Any) -> int:
    """Send `count` requests from two app hosts; returns how many were sent."""
    weather_tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    }

    async def one(client: VLLMMiddleware, i: int) -> None:
        kind = i % 10
        try:
            if kind == 9:  # an unknown model: logged as an error record, raised to us
                await client.chat_completion([{"role": "user", "content": "hi"}], model="nope")
            elif kind == 8:
                await client.completions(prompt=f"Once upon a time {i}", model=model)
            elif kind == 7:
                await client.chat_completion(
                    [{"role": "user", "content": "What's the weather in Paris?"}],
                    model=model,
                    tools=[weather_tool],
                    tool_choice="auto",
                )
            else:
                await client.chat_completion(
                    [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": f"Question number {i}: what is 2+{i}?"},
                    ],
                    model=model,
                    temperature=0.7,
                    max_tokens=64,
                    metadata={"experiment": "demo", "variant": "A" if i % 2 else "B"},
                )
        except APIError:
            pass

    clients = [
        VLLMMiddleware(base_url=base_url, host=f"demo-app-{n}", **client_args) for n in (1, 2)
    ]
    try:
        await asyncio.gather(*(one(clients[i % 2], i) for i in range(count)))
    finally:
        for client in clients:
            await client.close()
    return count


def _start_workers(redis_url: str, log_dir: str, count: int) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, VLLM_MW_STATS_INTERVAL_S="2")
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm_middleware_worker",
                "--redis-url",
                redis_url,
                "--log-dir",
                log_dir,
                "--consumer",
                f"demo-worker-{n}",
            ],
            env=env,
        )
        for n in range(1, count + 1)
    ]


def _wait_durable(redis_url: str, expected: int, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stats = get_statistics(redis_url)
    while stats["total_requests"] < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = get_statistics(redis_url)
    return stats


def _show(log_dir: str, stats: dict[str, Any]) -> None:
    _say("\n== statistics ==")
    for key, value in stats.items():
        _say(f"  {key:<20} {value}")
    _say(f"\n== files under {log_dir} ==")
    for path in iter_log_files(log_dir):
        _say(f"  {path.relative_to(log_dir)}  ({path.stat().st_size:,} bytes)")
    records = load_logs(log_dir)
    errors = [r for r in records if r.error is not None]
    ok = [r for r in records if r.error is None]
    _say(f"\n== load_logs: {len(records)} records, {len(errors)} errors ==")
    if ok:
        average = sum(r.latency_ms or 0 for r in ok) / len(ok)
        _say(f"  average latency of successful calls: {average:.2f} ms")
    for sample in ok[:1] + errors[:1]:
        text = json.dumps(sample.to_dict(), indent=2)
        _say(text if len(text) < 2500 else text[:2500] + "\n  ...")
    _say(
        "\nQuery them with DuckDB as they are:\n"
        f"  duckdb -c \"select host, count(*) from read_json('{log_dir}/*/*/*.jsonl') group by 1\""
    )


def run(args: argparse.Namespace) -> int:
    if args.log_dir is None:
        # The demo's own directory: start clean so the output shows this run only.
        shutil.rmtree(_DEFAULT_DIR, ignore_errors=True)
    log_dir = str(Path(args.log_dir or _DEFAULT_DIR))
    fake = None
    base_url = args.base_url
    if base_url is None:
        fake = FakeVLLMServer().start()
        base_url = fake.base_url
        _say("=" * 78)
        _say(f"Using a FAKE vLLM server at {base_url} (a test double that echoes prompts).")
        _say("Pass --base-url http://HOST:PORT/v1 to send the demo to a real vLLM server.")
        _say("=" * 78)
    redis_proc = None
    workers: list[subprocess.Popen[bytes]] = []
    try:
        redis_url = None if args.embedded else args.redis_url
        has_worker = importlib.util.find_spec("vllm_middleware_worker") is not None
        if not args.embedded and redis_url is None and shutil.which("redis-server") and has_worker:
            redis_proc = RedisServerProcess(appendonly=True).start()
            redis_url = redis_proc.url
            _say(f"Started a private redis-server (AOF on) at {redis_url}")
        elif not args.embedded and redis_url is None:
            _say("redis-server or the worker extra is not installed: using the embedded mode.")
        if redis_url:
            workers = _start_workers(redis_url, log_dir, args.workers)
            _say(f"Started {len(workers)} worker processes writing to {log_dir}")
            sent = asyncio.run(_traffic(base_url, args.model, args.requests, redis_url=redis_url))
            _say(f"Sent {sent} requests through Redis; waiting until all are durable ...")
            stats = _wait_durable(redis_url, sent)
            _stop(workers)
            workers = []
            from vllm_middleware_worker import WorkerConfig, open_consumer_redis, publish_file_stats

            async def publish() -> None:
                config = WorkerConfig(redis_url=redis_url or "", log_dir=log_dir)
                client = open_consumer_redis(config)
                try:
                    await publish_file_stats(client, config)
                finally:
                    await client.aclose()

            asyncio.run(publish())
            stats = get_statistics(redis_url)
        else:
            sent = asyncio.run(
                _traffic(base_url, args.model, args.requests, redis_url="", log_dir=log_dir)
            )
            _say(f"Sent {sent} requests in the embedded mode (no Redis).")
            stats = get_statistics(log_dir=log_dir)
        _show(log_dir, stats)
        return 0
    finally:
        _stop(workers)
        if redis_proc is not None:
            redis_proc.stop()
            redis_proc.cleanup()
        if fake is not None:
            fake.stop()


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:
            proc.kill()
