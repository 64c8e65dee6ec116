"""Client construction: what validating the settings costs next to the rest of building one.

Validation runs once per client, never per request. This measures, per construction: building
the httpx client (which every `VLLMMiddleware` does: the floor), validating `ClientSettings`
alone, and building a whole `VLLMMiddleware` with logging off (no sink to start, so what is
left is the client's own set-up).

`--compare DIR` measures the same in a subprocess importing `vllm_middleware` from `DIR`
(e.g. `git worktree add /tmp/base main` then `--compare /tmp/base/client`), in the same run,
interleaved with this tree's measurement, so a before/after table shares the machine's noise.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import banner, base_parser, median, print_table

ROUNDS = 3


def _per_call_us(make: Callable[[], Any], count: int) -> float:
    gc.collect()
    started = time.perf_counter()
    for _ in range(count):
        make()
    return (time.perf_counter() - started) / count * 1e6


def measure(count: int) -> dict[str, float]:
    """Microseconds per construction, by what is built (run in the process under test)."""
    import httpx
    import vllm_middleware
    from vllm_middleware import VLLMMiddleware

    os.environ.pop("VLLM_MW_REDIS_URL", None)
    results: dict[str, float] = {}
    made: list[Any] = []

    def httpx_client() -> None:
        made.append(httpx.AsyncClient(base_url="http://localhost:8081/v1", timeout=600.0))

    def off() -> None:
        made.append(VLLMMiddleware(enable_file_logging=False))

    builders: dict[str, Callable[[], None]] = {
        "httpx.AsyncClient": httpx_client,
        "VLLMMiddleware, logging off": off,
    }
    try:
        from vllm_middleware import _settings
    except ImportError:  # a version without the settings model
        _settings = None
    package_dir = os.path.dirname(vllm_middleware.__file__)
    if _settings is not None and os.path.dirname(_settings.__file__) == package_dir:
        settings_model = _settings.ClientSettings
        builders["ClientSettings.load"] = lambda: made.append(settings_model.load())
    for name, build in builders.items():
        build()  # warm up: imports, caches
        results[name] = _per_call_us(build, count)

        async def close_all() -> None:
            for item in made:
                if hasattr(item, "aclose"):
                    await item.aclose()

        asyncio.run(close_all())
        made.clear()
    print(f"measured {vllm_middleware.__file__}", file=sys.stderr)
    return results


def _measure_in(path: str | None, count: int) -> dict[str, float]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(count)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(int(sys.argv[2]))))
        return
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compare", help="a directory holding another vllm_middleware")
    args = parser.parse_args()
    banner("client_construction", args)
    count = 20 if args.quick else 200  # an httpx client costs milliseconds (its SSL context)
    trees = {"this tree": None, **({"compared": args.compare} if args.compare else {})}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(ROUNDS):
        for name, path in trees.items():  # interleaved, so both see the same noise
            samples[name].append(_measure_in(path, count))
    rows = []
    for what in samples["this tree"][0]:
        row: list[Any] = [what]
        for name in trees:
            values = [s[what] for s in samples[name] if what in s]
            row.append(f"{median(values):.1f}" if values else "n/a")
        rows.append(row)
    print_table(
        f"µs per construction (median of {ROUNDS} rounds of {count})",
        ["built", *trees],
        rows,
    )


if __name__ == "__main__":
    main()
