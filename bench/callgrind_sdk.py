"""Instructions per call under callgrind: the capture transport's cost, door and recorder apart.

The calls of `sdk_transport.py` (a chat call through a bare `httpx`/`httpx2` client on a mock
upstream, a JSON reply or a stream of 24 events read to the end), sync and async, for both
HTTP libraries, with three transports:

- `bare`: the mock upstream alone;
- `nolog`: the capture transport with logging off (`enable_file_logging=False`): the door does
  all its work (headers, the request body, the `Call`, observing the reply, the stream's fold)
  and the recorder builds no record;
- `embedded`: the capture transport writing records (the default writer process; the shipping
  thread is traced, the writer process is not).

door = nolog - bare, recorder = embedded - nolog. Each figure is (instructions of a run of
`many` calls - those of a run of `few`) / (many - few), so imports and start-up cancel out;
`PYTHONHASHSEED=0` keeps runs repeatable. `--baseline REV` traces that git revision's client
too (before/after in one run). Instruction counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
MODES = ("bare", "nolog", "embedded")
WARM_UP = 10


def child(lib_name: str, is_async: bool, stream: bool, mode: str, n: int) -> None:
    from sdk_transport import http_call_async, http_call_sync, make_upstream

    lib = importlib.import_module(lib_name)
    transport = make_upstream(lib, is_async=is_async)
    if mode != "bare":
        capture = importlib.import_module(
            "vllm_middleware.httpx2" if lib_name == "httpx2" else "vllm_middleware"
        )
        wrapper = capture.AsyncCaptureTransport if is_async else capture.CaptureTransport
        where: dict[str, Any] = (
            {"enable_file_logging": False}
            if mode == "nolog"
            else {"log_dir": tempfile.mkdtemp(prefix="bench-sdk-cg-"), "flush_interval": 2.5}
        )
        transport = wrapper(transport, redis_url="", **where)
    if is_async:

        async def run() -> None:
            client = lib.AsyncClient(transport=transport, base_url="http://vllm/v1")
            for _ in range(WARM_UP + n):
                await http_call_async(client, stream)
            await client.aclose()

        asyncio.run(run())
        return
    client = lib.Client(transport=transport, base_url="http://vllm/v1")
    for _ in range(WARM_UP + n):
        http_call_sync(client, stream)
    client.close()


def instructions(client_dir: Path | None, spec: list[str], scratch: Path, keep: bool) -> int:
    from _common import callgrind_total

    out = scratch / f"callgrind.{'-'.join(spec)}.{len(list(scratch.iterdir()))}"
    env = {"VLLM_MW_REDIS_TIMEOUT": "300"}
    total = callgrind_total(SCRIPT, spec, out, client_dir=client_dir, env=env, keep=keep)
    if keep:
        print(f"    kept {out}", flush=True)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--libs", nargs="*", default=["httpx2", "httpx"])
    parser.add_argument("--clients", nargs="*", default=["sync", "async"])
    parser.add_argument("--replies", nargs="*", default=["json", "stream"])
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--baseline", default=None, help="git revision to compare with")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind files")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(SCRIPT.parent))
    if args.child:
        lib, is_async, stream, mode, n = args.child
        child(lib, is_async == "async", stream == "stream", mode, int(n))
        return
    from _common import banner, print_table

    banner("callgrind_sdk", args)
    few, many = (20, 80) if args.quick else (100, 400)
    versions: list[tuple[str, Path | None]] = [("after", None)]
    if args.baseline:
        from _versions import baseline_client

        versions.insert(0, (f"before ({args.baseline})", baseline_client(args.baseline)))
    scratch = Path(tempfile.mkdtemp(prefix="bench-callgrind-sdk-"))
    per_call: dict[tuple[str, str, str, str, str], float] = {}
    try:
        for lib in args.libs:
            for client in args.clients:
                for reply in args.replies:
                    for mode in args.modes:
                        for name, client_dir in versions:
                            if mode == "bare" and client_dir is not None:
                                continue  # does not depend on the client's version
                            spec = [lib, client, reply, mode]
                            runs = [
                                instructions(client_dir, [*spec, str(n)], scratch, args.keep)
                                for n in (few, many)
                            ]
                            key = (lib, client, reply, mode, name)
                            per_call[key] = (runs[1] - runs[0]) / (many - few)
                            print(f"  {' '.join(key)}: {per_call[key] / 1000:.1f}k", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for lib in args.libs:
        for client in args.clients:
            for reply in args.replies:
                bare = per_call.get((lib, client, reply, "bare", "after"))
                for name, _ in versions:
                    nolog = per_call.get((lib, client, reply, "nolog", name))
                    embedded = per_call.get((lib, client, reply, "embedded", name))

                    def k(value: float | None) -> str:
                        return "" if value is None else f"{value / 1000:+.1f}k"

                    door = None if bare is None or nolog is None else nolog - bare
                    recorder = None if nolog is None or embedded is None else embedded - nolog
                    total = None if bare is None or embedded is None else embedded - bare
                    rows.append([
                        lib, client, reply, name,
                        "" if bare is None else f"{bare / 1000:.1f}k",
                        k(door), k(recorder), k(total),
                    ])  # fmt: skip
    print_table(
        f"capture transport: instructions per call (callgrind, ({many} - {few}) / {many - few})",
        ["library", "client", "reply", "version", "bare", "door", "recorder", "added"],
        rows,
    )


if __name__ == "__main__":
    main()
