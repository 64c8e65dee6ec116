"""Instructions per `submit` (callgrind): the request path's hand-off to the shipper, alone.

`callgrind_request.py` traces whole requests, whose spread on a loaded machine (±20k) hides
a change of a few hundred instructions. Here a shipper (Redis: a client that is never
contacted; embedded: the writer thread) takes N encoded ~1 KB records from a loop that does
nothing else; its flush timer (60 s) and batch size (10^6) keep the shipping thread asleep,
so the figure is `submit` itself: (instructions of N2 submits - of N1) / (N2 - N1). Both
versions in the same run: this checkout and `--baseline` (a git revision).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve()
SINKS = ("redis", "embedded")


async def child(sink_kind: str, count: int, log_dir: str) -> None:
    import orjson
    import redis.asyncio as aioredis
    from vllm_middleware._sinks import _destination
    from vllm_middleware._sinks._shipping import ShippingSettings
    from vllm_middleware.storage import RecordEntry, StreamKeys

    settings = ShippingSettings(
        max_buffer=2_000_000, batch_size=1_000_000, flush_interval=60.0, spool=False
    )
    data = orjson.dumps({"request_id": "r", "pad": "x" * 1000})
    entry = RecordEntry("2026-01-02", "h", False, data)
    # After issue 13 the shippers are built by factories; before, the sinks were shippers.
    if sink_kind == "redis":
        client = aioredis.Redis.from_url("redis://127.0.0.1:1")  # never contacted
        if hasattr(_destination, "redis_shipper"):
            shipper = _destination.redis_shipper(client, keys=StreamKeys(), shipping=settings)
        else:
            from vllm_middleware._sinks._redis_sink import RedisStreamSink

            shipper = RedisStreamSink(client, keys=StreamKeys(), shipping=settings)
    elif hasattr(_destination, "file_shipper"):
        settings = ShippingSettings(
            max_buffer=2_000_000, batch_size=1_000_000, flush_interval=60.0,
            embedded_writer="thread",
        )  # fmt: skip
        shipper = _destination.file_shipper(log_dir, max_bytes=1 << 30, shipping=settings)
    else:
        from vllm_middleware._sinks._file_sink import FileSink

        settings = ShippingSettings(
            max_buffer=2_000_000, batch_size=1_000_000, flush_interval=60.0,
            embedded_writer="thread",
        )  # fmt: skip
        shipper = FileSink(log_dir, max_bytes=1 << 30, shipping=settings)
    submit = shipper.submit
    for _ in range(count):
        submit(entry)
    os._exit(0)  # no close: its flush would be traced too


def instructions(client_dir: Path | None, args: list[str], scratch: Path) -> int:
    from _common import callgrind_total

    out = Path(tempfile.mktemp(dir=scratch, suffix=".out"))
    return callgrind_total(SCRIPT, args, out, client_dir=client_dir, keep=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--counts", nargs=2, type=int, default=[4_000, 24_000])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sink", default="redis")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--log-dir", default="")
    args = parser.parse_args()
    sys.path.insert(0, str(SCRIPT.parent))
    if args.child:
        asyncio.run(child(args.sink, args.count, args.log_dir))
        return
    from _common import banner, print_table
    from _versions import baseline_client

    banner("callgrind_submit", args)
    baseline = baseline_client(args.baseline)
    versions: list[tuple[str, Path | None]] = [
        (f"before ({args.baseline})", baseline),
        ("after (this checkout)", None),
    ]
    scratch = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    small, large = args.counts
    rows = []
    for sink in SINKS:
        for name, client_dir in versions:
            counts = [
                instructions(
                    client_dir,
                    ["--sink", sink, "--count", str(n), "--log-dir", tempfile.mkdtemp(dir=scratch)],
                    scratch,
                )
                for n in (small, large)
            ]
            rows.append([sink, name, f"{(counts[1] - counts[0]) / (large - small):,.0f}"])
            print(f"  done: {sink} {name}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(baseline.parent, ignore_errors=True)
    print_table(
        f"Instructions per submit (callgrind; ({large:,} - {small:,}) / {large - small:,})",
        ["sink", "version", "instructions/submit"],
        rows,
    )


if __name__ == "__main__":
    main()
