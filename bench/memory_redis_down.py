"""Memory with Redis down: client RSS under sustained load must plateau at the buffer bound.

A `VLLMMiddleware` in Redis mode points at a stopped private redis-server (nothing listens on
its port) and sends chat requests over an `httpx.MockTransport` at concurrency 32. With the
spool off, every record is buffered until `max_buffer`, then dropped and counted; with the spool
on (the default), batches go to disk and the buffer stays small. Each run is a fresh process
(freed memory is not returned to the OS, so runs must not share one).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import shutil
import tempfile
from typing import Any

import httpx
from _common import banner, base_parser, print_table, rss_mb, sample_messages
from client_overhead import MODEL, drive, mock_handler
from vllm_middleware import VLLMMiddleware
from vllm_middleware_testing import RedisServerProcess


def child(redis_url: str, bound: int, total: int, spool: bool, results: Any) -> None:
    # Spool off: everything waits in the memory buffer, which must plateau at max_buffer.
    # Spool on (the default): batches go to disk, and the buffer stays near one batch.
    os.environ["VLLM_MW_SPOOL"] = "1" if spool else "0"
    os.environ["VLLM_MW_SPOOL_DIR"] = tempfile.mkdtemp(prefix="bench-spool-")

    async def run() -> list[list[Any]]:
        http = httpx.AsyncClient(base_url="http://mock.invalid/v1",
                                 transport=httpx.MockTransport(mock_handler))
        mw = VLLMMiddleware("http://mock.invalid/v1", log_dir=tempfile.mkdtemp(),
                            redis_url=redis_url, http_client=http, max_buffer=bound,
                            stream="bench:down")
        messages = sample_messages()

        async def call() -> Any:
            return await mw.chat_completion(messages, model=MODEL, temperature=0.2,
                                            max_tokens=256)

        # Warm-up with logging off, so imports and httpx's caches are in the baseline.
        plain = VLLMMiddleware("http://mock.invalid/v1", http_client=http,
                               enable_file_logging=False)
        async def plain_call() -> Any:
            return await plain.chat_completion(messages, model=MODEL)

        await drive(plain_call, 2000, 32)
        gc.collect()
        rows = [[0, 0, 0, rss_mb()]]
        step = total // 10
        for done in range(step, total + 1, step):
            await drive(call, step, 32)
            gc.collect()
            sink = mw._sink
            assert sink is not None
            rows.append([done, sink.buffered, sink.counters.dropped, rss_mb()])
        await mw.close(timeout=0.5)
        await http.aclose()
        return rows

    results.put((bound, asyncio.run(run())))
    shutil.rmtree(os.environ["VLLM_MW_SPOOL_DIR"], ignore_errors=True)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    banner("memory_redis_down", args)
    runs = [(5_000, False), (20_000, False), (20_000, True)]
    if not args.quick:
        runs = [(10_000, False), (50_000, False), (50_000, True)]
    ctx = mp.get_context("spawn")
    server = RedisServerProcess().start()
    url = server.url
    server.stop()  # keep the port, with nothing listening on it
    try:
        for bound, spool in runs:
            total = max(3 * bound, 30_000)
            results = ctx.Queue()
            proc = ctx.Process(target=child, args=(url, bound, total, spool, results))
            proc.start()
            _, rows = results.get(timeout=600)
            proc.join(timeout=60)
            base = rows[0][3]
            table = [[r[0], r[1], r[2], r[3], r[3] - base] for r in rows]
            print_table(
                f"Redis down, max_buffer={bound:,}, spool {'on' if spool else 'off'}: "
                "RSS (MiB) as requests go on",
                ["requests", "buffered", "dropped", "RSS MiB", "above baseline"], table,
            )
            full = [r for r in rows if r[1] >= bound]
            if len(full) >= 2:
                growth = full[-1][3] - full[0][3]
                per_rec = (full[0][3] - base) * 1024 / bound
                print(f"after the buffer filled: RSS moved {growth:+.1f} MiB over "
                      f"{full[-1][0] - full[0][0]:,} more requests (plateau); "
                      f"~{per_rec:.2f} KiB per buffered record")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
