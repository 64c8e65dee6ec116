"""Permission modes of what the library creates: records hold prompts and answers.

Log files and media are 0640 and their directories 0750 by default (a reader group can be given
access), the spool 0600/0700; `file_mode`/`dir_mode` (env `VLLM_MW_FILE_MODE`/`_DIR_MODE`)
change the first pair. The modes are set explicitly after creating (`fchmod`/`chmod`), so the
process umask neither widens nor narrows them. Only what the library creates gets them: an
existing directory (the user's `log_dir`, say) keeps its own mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ._exceptions import ConfigurationError

__all__ = [
    "LOG_MODES",
    "SPOOL_MODES",
    "FileModes",
    "create_file",
    "log_modes",
    "make_dirs",
    "parse_mode",
]

FILE_MODE_ENV = "VLLM_MW_FILE_MODE"
DIR_MODE_ENV = "VLLM_MW_DIR_MODE"


class FileModes(NamedTuple):
    file: int
    dir: int


LOG_MODES = FileModes(0o640, 0o750)
SPOOL_MODES = FileModes(0o600, 0o700)


def parse_mode(value: int | str, name: str) -> int:
    """A permission mode from an int (0o640) or octal text ("0640", "640", "0o640")."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{name} must be an octal mode like 0640, not {value!r}")
    if isinstance(value, int):
        mode = value
    else:
        text = value.strip().lower().removeprefix("0o")
        try:
            mode = int(text, 8)
        except ValueError:
            raise ConfigurationError(
                f"{name} must be an octal mode like 0640, not {value!r}"
            ) from None
    if not 0 <= mode <= 0o777:
        raise ConfigurationError(f"{name} must be between 0000 and 0777, not {value!r}")
    return mode


def log_modes(file_mode: int | str | None = None, dir_mode: int | str | None = None) -> FileModes:
    """Modes for logs and media: arguments, else the environment, else 0640/0750.

    A directory mode without the owner's write and search bits would make the writer fail
    on its own directories: refused here rather than at the first write.
    """
    raw_file = file_mode if file_mode is not None else os.environ.get(FILE_MODE_ENV) or None
    raw_dir = dir_mode if dir_mode is not None else os.environ.get(DIR_MODE_ENV) or None
    modes = FileModes(
        LOG_MODES.file if raw_file is None else parse_mode(raw_file, "file_mode"),
        LOG_MODES.dir if raw_dir is None else parse_mode(raw_dir, "dir_mode"),
    )
    if modes.file & 0o600 != 0o600:
        raise ConfigurationError(f"file_mode {modes.file:04o} must let the owner read and write")
    if modes.dir & 0o700 != 0o700:
        raise ConfigurationError(f"dir_mode {modes.dir:04o} must give the owner rwx")
    return modes


def make_dirs(path: Path, mode: int) -> None:
    """`mkdir -p` where each directory created gets `mode`, whatever the umask."""
    missing: list[Path] = []
    current = path
    while not current.exists():  # a file in the way fails below, as `mkdir -p` does
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:  # made by another process meanwhile: its mode is its own
            if not directory.is_dir():
                raise
            continue
        os.chmod(directory, mode)


def create_file(path: Path | str, flags: int, mode: int) -> tuple[int, bool]:
    """Open `path` with `flags` (O_CREAT implied), giving `mode` to it if this call made it.

    Returns (fd, created).
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, flags & ~os.O_EXCL), False
    if not hasattr(os, "fchmod"):  # Windows: no such modes
        return fd, True
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, True
