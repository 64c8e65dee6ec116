"""What the process does for every `Shipper` at its edges: exit and fork.

At interpreter exit (`atexit`), every running shipper is asked to save what it holds (ship it,
or spool it / write it) within `EXIT_TIMEOUT_S`: an app that ends without closing its client
loses nothing. By then the executors refuse new work, so `run_blocking` does such work in
place. In a forked child the shippers forget the parent's thread and records.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._sinks._shipping import Shipper

__all__ = ["EXIT_TIMEOUT_S", "close_all", "register", "run_blocking"]

_T = TypeVar("_T")
#: seconds the shippers still open at interpreter exit get to save what they hold
EXIT_TIMEOUT_S = 5.0


async def run_blocking(
    executor: concurrent.futures.Executor | None, func: Callable[..., _T], *args: Any
) -> _T:
    """`func(*args)` on `executor`, or right here once the interpreter is exiting (executors
    refuse new work then, and the exit handler's flush must still reach the disk)."""
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(executor, func, *args)
    except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
        return func(*args)
    return await future


# Every shipper of the process, to close at exit and to reset in a forked child.
_ALL: weakref.WeakSet[Shipper] = weakref.WeakSet()


def register(shipper: Shipper) -> None:
    _ALL.add(shipper)


def close_all(timeout: float = EXIT_TIMEOUT_S) -> None:
    """Save what every running shipper holds (ship it, or spool it / write it), bounded by
    `timeout` in all. Registered with `atexit`: a client left open at exit loses nothing."""
    running = [shipper for shipper in list(_ALL) if shipper.running]
    futures = [shipper.close_soon(timeout) for shipper in running]
    if futures:
        concurrent.futures.wait(futures, timeout + 1.0)


def _after_fork_in_child() -> None:
    for shipper in list(_ALL):
        shipper.after_fork_in_child()


atexit.register(close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
