"""Helpers shared by the benchmark scripts: arguments, tables, statistics, records, machine info.

Nothing here is timed itself. Every script compares figures measured in the same run, so a
noisy machine shifts both sides of a comparison rather than one of them.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "BENCH_HOST",
    "banner",
    "base_parser",
    "cpu_seconds",
    "fmt",
    "machine_info",
    "make_record",
    "median",
    "pct",
    "print_table",
    "quiet_gc",
    "rss_mb",
    "sample_messages",
    "timed",
    "today",
]

BENCH_HOST = "bench-host-01"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    return parser


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100_000:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table (pasteable into docs/benchmarks.md)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


def rss_mb(pid: int | None = None) -> float:
    """Resident set size in MiB, from /proc (no dependency)."""
    with open(f"/proc/{pid or 'self'}/statm") as handle:
        resident = int(handle.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (e.g. redis-server), from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect before a measured window so one run does not pay for the previous one's garbage."""
    gc.collect()
    yield


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


# -- records ------------------------------------------------------------------------------------

_WORDS = (  # noqa: SIM905 - prose reads better than a word list
    "the quick brown fox jumps over a lazy dog while the model answers questions about "
    "weather reports, invoices, code reviews and travel plans for many different users"
).split()


def _text(n_bytes: int, seed: int = 0) -> str:
    words: list[str] = []
    size = 0
    i = seed
    while size < n_bytes:
        word = _WORDS[i % len(_WORDS)]
        words.append(word)
        size += len(word) + 1
        i += 7
    return " ".join(words)[:n_bytes]


def sample_messages(user_bytes: int = 100) -> list[dict[str, str]]:
    """A chat request whose logged record (request + echoed reply + fields) is about 1 KB."""
    return [
        {"role": "system", "content": "You are a concise assistant for an internal tool."},
        {"role": "user", "content": _text(user_bytes, 3)},
    ]


def make_record(size: int, seq: int = 0, *, sent: float | None = None) -> bytes:
    """An encoded record shaped like the client's (contract fields), padded to ~`size` bytes."""
    now = datetime.now(UTC)
    record: dict[str, Any] = {
        "timestamp": now.isoformat(),
        "request_id": f"req_{now:%Y%m%d_%H%M%S}_bench{os.getpid():x}_{seq}",
        "model": "vllm:qwen-2.5-omni-7b",
        "messages": [{"role": "user", "content": ""}],
        "response": {
            "id": f"chatcmpl-{seq}",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Echo: ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 40, "completion_tokens": 42, "total_tokens": 82},
        },
        "parameters": {"temperature": 0.2, "max_tokens": 256},
        "latency_ms": 12.5,
        "error": None,
        "metadata": {"app": "bench"},
        "schema_version": 2,
        "host": BENCH_HOST,
        "endpoint": "chat/completions",
        "status_code": 200,
        "usage": {"prompt_tokens": 40, "completion_tokens": 42, "total_tokens": 82},
        "stream": False,
        "ttft_ms": None,
    }
    if sent is not None:
        record = {"bench_sent": sent, **record}
    base = len(orjson.dumps(record))
    record["messages"][0]["content"] = _text(max(0, size - base), seq)
    return orjson.dumps(record)


# -- machine ----------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_info(directory: str | os.PathLike[str] = ".") -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    disk = _run(["df", "-h", "--output=source,fstype,size", str(Path(directory).resolve())])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "disk": " ".join(disk.splitlines()[-1].split()) if disk else "?",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis-server": _run(["redis-server", "--version"]).split(" ")[2].removeprefix("v=")
        if _run(["redis-server", "--version"]).count(" ") >= 2
        else "?",
        "redis-py": _version("redis"),
        "hiredis": _version("hiredis"),
        "httpx": _version("httpx"),
        "orjson": _version("orjson"),
        "load (1/5/15 min)": " ".join(_run(["cat", "/proc/loadavg"]).split()[:3]),
    }


def banner(name: str, args: argparse.Namespace) -> None:
    info = machine_info()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"# {name}  ({'quick' if getattr(args, 'quick', False) else 'full'} run, {stamp})")
    print("  " + "; ".join(f"{k}: {v}" for k, v in info.items()))
    sys.stdout.flush()


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0, result


def callgrind_total(
    script: Path,
    child_args: Sequence[str],
    out: Path,
    *,
    client_dir: Path | None = None,
    env: dict[str, str] | None = None,
    keep: bool = False,
) -> int:
    """Instructions of `python SCRIPT --child ARGS`, run whole under valgrind's callgrind.

    `client_dir` goes first on PYTHONPATH (another version's client); `env` adds variables.
    The hash seed is fixed: string hashes decide dict probing, which moves counts by thousands.
    """
    run_env = dict(os.environ, PYTHONHASHSEED="0", **(env or {}))
    if client_dir is not None:
        run_env["PYTHONPATH"] = str(client_dir) + os.pathsep + run_env.get("PYTHONPATH", "")
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
         sys.executable, str(script), "--child", *child_args],
        env=run_env, check=True, capture_output=True, timeout=3600,
    )  # fmt: skip
    total = callgrind_summary(out)
    if not keep:
        out.unlink()
    return total


def callgrind_summary(out: Path) -> int:
    """The total instruction count of a callgrind output file."""
    text = out.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
    assert found, f"no summary in {out}"
    return int(found.group(1))
