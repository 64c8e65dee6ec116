"""The start-up check of the log directory: a worker that cannot write says so at once.

Without it, a worker given a directory it cannot write (under a regular file, read-only, no
permission) starts, takes entries, and then only warns and retries. The check does what a
batch does - create the directories, create a file, write, fsync - with a probe it removes.
"""

from __future__ import annotations

import os
from pathlib import Path

from vllm_middleware import ConfigurationError
from vllm_middleware.storage import LOG_MODES, make_dirs

__all__ = ["check_log_dir"]


def check_log_dir(log_dir: str | os.PathLike[str], dir_mode: int = LOG_MODES.dir) -> None:
    """Raise `ConfigurationError` (one line, naming the directory and the cause) unless a file
    can be created, written, synced and removed in `log_dir` (made with `dir_mode` if missing).
    """
    path = Path(log_dir)
    probe = path / f".vllm-mw-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        make_dirs(path, dir_mode)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"cannot write to the log directory {log_dir}: {reason}") from None
