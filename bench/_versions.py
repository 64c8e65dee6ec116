"""Running one measurement against two versions of the client in the same run.

`baseline_client(ref)` extracts the `client/` package of a git revision into a temporary
directory; `run_child(script, client_dir, args)` runs `script --child ...` in a fresh
interpreter that imports the package from that directory (through PYTHONPATH, which comes
before the editable install), and returns the JSON object it prints last. The parent
interleaves the versions, so both see the same machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

import orjson

__all__ = ["ROOT", "baseline_client", "run_child"]

ROOT = Path(__file__).resolve().parent.parent


def baseline_client(ref: str) -> Path:
    """`client/` of `ref`, extracted into a temporary directory (returned: the import root)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "client"], capture_output=True, check=True
    ).stdout
    target = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "client"


def run_child(
    script: Path, client_dir: Path | None, args: list[str], timeout: float = 600
) -> dict[str, Any]:
    """Run `script --child args...` with the client of `client_dir` (None: this checkout)."""
    env = dict(os.environ)
    if client_dir is not None:
        env["PYTHONPATH"] = str(client_dir) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, str(script), "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {args} failed:\n{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1]
    result: dict[str, Any] = orjson.loads(last)
    return result
