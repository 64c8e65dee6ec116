"""Redis URLs and passwords, for the client's and the worker's settings and command lines:
checked before redis-py sees them, masked wherever they are shown, and a password read from
a file or the environment rather than from argv (which every user of the machine can read).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import ValidationInfo

__all__ = [
    "REDIS_SCHEMES",
    "argv_password_warning",
    "check_password_file",
    "check_redis_url",
    "mask_url",
    "password_of",
    "read_password_file",
    "with_password",
]

REDIS_SCHEMES = ("redis", "rediss", "unix")


def mask_url(url: str) -> str:
    """`url` with its password replaced by `***` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def argv_password_warning(url: str | None) -> str | None:
    """A warning when a command-line URL carries a password (argv is public: `ps`)."""
    try:
        has_password = url is not None and urlsplit(url).password is not None
    except ValueError:
        return None
    if not has_password:
        return None
    return (
        "the password in --redis-url is visible to every user of this machine (ps); "
        "use VLLM_MW_REDIS_PASSWORD_FILE or VLLM_MW_REDIS_PASSWORD instead"
    )


def check_redis_url(url: str) -> str:
    """`url` if redis-py can use it, else a `ValueError` saying why (password masked)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"not a URL ({exc})") from None
    if parts.scheme not in REDIS_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in REDIS_SCHEMES)
        raise ValueError(f"must start with one of {schemes}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("has no host")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError("has an invalid port") from None
    return url


def read_password_file(path: str) -> str:
    """The password in file `path` (one line; the trailing newline is not part of it)."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read it: {reason}") from None
    password = text.rstrip("\r\n")
    if not password or "\n" in password:
        raise ValueError("must hold the password on one line")
    return password


def with_password(url: str, password: str | None) -> str:
    """`url` with `password` added; refused when the URL already carries a different one."""
    if password is None:
        return url
    parts = urlsplit(url)
    if parts.password is not None:
        if unquote(parts.password) == password:
            return url
        raise ValueError(
            "carries a password and another comes from VLLM_MW_REDIS_PASSWORD(_FILE): keep one"
        )
    user = quote(unquote(parts.username), safe="") if parts.username else ""
    netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return parts._replace(netloc=netloc).geturl()


def check_password_file(cls: Any, value: str | None) -> str | None:
    """Field validator: the password file can be read (its content is checked here)."""
    if value:
        read_password_file(value)
    return value or None


def password_of(info: ValidationInfo) -> str | None:
    """The password given beside the URL (validated before it: fields are in that order)."""
    path = info.data.get("redis_password_file")
    password = info.data.get("redis_password") or None
    if path:
        from_file = read_password_file(path)
        if password is not None and password != from_file:
            raise ValueError("VLLM_MW_REDIS_PASSWORD and VLLM_MW_REDIS_PASSWORD_FILE differ")
        return from_file
    return password
