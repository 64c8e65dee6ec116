"""Helpers of the fault-injection suite: client load with latency measurement, file counting,
and the summary table (printed, and appended as JSON lines to `$VLLM_MW_FAULT_TABLE`)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from vllm_middleware import VLLMMiddleware, iter_log_files

RESPONSE = {
    "id": "cmpl-1",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def mock_http() -> httpx.AsyncClient:
    """An in-process 'vLLM' that answers at once: what remains of a call's time is ours."""
    return httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, json=RESPONSE)),
        base_url="http://vllm.test/v1",
    )


@dataclass
class Load:
    """Concurrent request loops against one client; records which calls returned, and when."""

    client: VLLMMiddleware
    tag: str
    loops: int = 4
    pause: float = 0.004  # between calls of one loop: ~1000 calls/s with 4 loops
    pad: int = 200  # bytes of padding per message: records of ~0.6 KB
    sent: list[int] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _seq: int = 0
    fault_window: tuple[float, float] | None = None  # perf_counter span of the fault

    def start(self) -> Load:
        # The test process's heap (pytest, earlier tests) makes each full garbage collection
        # cost tens of ms, which would show up as "latency during the fault". Freezing moves
        # what exists now out of the collector's scans; new objects are collected as usual.
        gc.freeze()
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self.loops)]
        return self

    async def _loop(self) -> None:
        padding = "x" * self.pad
        while not self._stop.is_set():
            seq = self._seq
            self._seq += 1
            started = time.perf_counter()
            await self.client.chat_completion(
                [{"role": "user", "content": f"{self.tag} {seq} {padding}"}],
                model="m",
                metadata={"tag": self.tag, "seq": seq},
            )
            self.latencies.append((started, time.perf_counter() - started))
            self.sent.append(seq)
            await asyncio.sleep(self.pause)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        gc.unfreeze()

    def max_latency_ms(self, start: float, end: float) -> float:
        inside = [d for s, d in self.latencies if start <= s < end]
        return max(inside, default=0.0) * 1000

    def p99_ms(self, start: float, end: float) -> float:
        inside = sorted(d for s, d in self.latencies if start <= s < end)
        return inside[int(len(inside) * 0.99)] * 1000 if inside else 0.0


def stored(
    log_dir: Path, tag: str | None = None, *, settled: bool = True
) -> Counter[tuple[str, int]]:
    """(tag, seq) of every record in the files, with multiplicity (a count > 1 is a duplicate).

    Reads every line: a torn or unparsable line fails the test. `settled=False` is for polling
    while workers still write: a file's last line without its newline is then a write in
    progress (a reader can see part of a write to a regular file), left for the next look.
    """
    found: Counter[tuple[str, int]] = Counter()
    if not log_dir.is_dir():
        return found
    for path in iter_log_files(log_dir):
        data = path.read_bytes()
        if not settled:
            data = data[: data.rfind(b"\n") + 1]
        assert not data or data.endswith(b"\n"), f"torn line at the end of {path}"
        for line in data.splitlines():
            meta = orjson.loads(line)["metadata"]
            if "tag" in meta and (tag is None or meta["tag"] == tag):
                found[(meta["tag"], meta["seq"])] += 1
    return found


def report(
    fault: str,
    sent: int,
    found: Counter[Any],
    *,
    baseline_ms: float,
    fault_ms: float,
    fault_p99_ms: float | None = None,
) -> dict[str, Any]:
    row = {
        "fault": fault,
        "sent": sent,
        "stored": len(found),
        "duplicates": sum(n - 1 for n in found.values()),
        "baseline_max_ms": round(baseline_ms, 1),
        "fault_max_ms": round(fault_ms, 1),
        "added_ms": round(max(0.0, fault_ms - baseline_ms), 1),
        "fault_p99_ms": None if fault_p99_ms is None else round(fault_p99_ms, 2),
    }
    print(
        f"\nFAULT {row['fault']}: sent={row['sent']} stored={row['stored']} "
        f"duplicates={row['duplicates']} max latency baseline={row['baseline_max_ms']} ms, "
        f"during fault={row['fault_max_ms']} ms (added {row['added_ms']} ms), "
        f"p99 during fault={row['fault_p99_ms']} ms"
    )
    target = os.environ.get("VLLM_MW_FAULT_TABLE")
    if target:
        with open(target, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    return row


def worker_env(**extra: str) -> dict[str, str]:
    env = {"VLLM_MW_BLOCK_MS": "200", "VLLM_MW_BATCH_SIZE": "500"}
    env.update(extra)
    return env


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll without blocking the loop (the load keeps running); fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.2)


async def check_all_stored(
    fault: str,
    load: Load,
    log_dir: Path,
    baseline: float,
    during: float,
    *,
    timeout: float = 60,
    settle: float = 0.5,
) -> None:
    """Every call that returned has exactly one record in the files; add the table row."""
    sent = {(load.tag, s) for s in load.sent}

    def all_stored() -> bool:
        return set(stored(log_dir, load.tag, settled=False)) >= sent

    await until(all_stored, timeout, f"{fault}: all stored")
    await asyncio.sleep(settle)  # let a late duplicate show up
    found = stored(log_dir, load.tag)
    p99 = load.p99_ms(*load.fault_window) if load.fault_window else None
    report(fault, len(sent), found, baseline_ms=baseline, fault_ms=during, fault_p99_ms=p99)
    assert set(found) == sent
    assert max(found.values()) == 1, "duplicates in the files"
