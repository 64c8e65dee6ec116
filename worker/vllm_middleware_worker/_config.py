"""Worker settings: defaults, environment (`VLLM_MW_*`) and command-line flags, in that order.

A pydantic model (see `vllm_middleware._settings`): every value is checked once, at start-up,
and a bad one is a `ConfigurationError` naming the variable or flag, the value and the range.
The README's worker table is rendered from this model.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import ValidationInfo, field_validator
from vllm_middleware import ConfigurationError
from vllm_middleware._redis_url import (
    check_password_file,
    check_redis_url,
    password_of,
    with_password,
)
from vllm_middleware._settings import (
    EnvSettings,
    env_field,
    redis_password_field,
    redis_password_file_field,
)
from vllm_middleware.storage import FileModes, log_modes, parse_mode

__all__ = ["WorkerConfig"]


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


_Positive = annotated_types.Gt(0)


class WorkerConfig(EnvSettings):
    redis_password: str | None = redis_password_field()
    redis_password_file: str | None = redis_password_file_field()
    redis_url: str = env_field(
        "redis://127.0.0.1:6379/0",
        "VLLM_MW_REDIS_URL",
        "the Redis the clients write to",
        allowed="a redis://, rediss:// or unix:// URL",
        validate_default=True,  # applies VLLM_MW_REDIS_PASSWORD(_FILE)
        repr=False,
    )
    log_dir: str = env_field(
        "./logs/vllm", "VLLM_MW_LOG_DIR", "root of the partition tree", min_length=1
    )
    max_log_size_mb: Annotated[float, _Positive] = env_field(
        100.0, "VLLM_MW_MAX_LOG_SIZE_MB", "rotate files at this size"
    )
    log_format: Literal["jsonl", "json"] = env_field(
        "jsonl", "VLLM_MW_LOG_FORMAT", "`json`: each record pretty-printed"
    )
    stream: str = env_field(
        "vllm:logs", "VLLM_MW_STREAM", "stream key (the clients' `stream`)", min_length=1
    )
    consumer: str = env_field(
        _default_consumer,
        "VLLM_MW_CONSUMER",
        "this worker's name in the consumer group; names the files it owns",
        shown_default="`host-pid-random`",
        min_length=1,
    )
    batch_size: Annotated[int, _Positive] = env_field(
        4000,
        "VLLM_MW_BATCH_SIZE",
        "records per batch at most (one fsync per touched file per batch)",
    )
    batch_bytes: Annotated[int, _Positive] = env_field(
        4 * 1024 * 1024,
        "VLLM_MW_BATCH_BYTES",
        "bytes per batch at most, whichever limit comes first",
        shown_default="4 MiB",
    )
    block_ms: Annotated[int, _Positive] = env_field(
        1000, "VLLM_MW_BLOCK_MS", "how long one read waits for new entries (ms)"
    )
    fsync: bool = env_field(
        True, "VLLM_MW_FSYNC", "fsync each batch before acknowledging it (off: faster, unsafe)"
    )
    heartbeat_ttl_s: Annotated[float, _Positive] = env_field(
        30.0,
        "VLLM_MW_HEARTBEAT_TTL_S",
        "a worker silent this long is dead; its entries are taken over",
    )
    claim_interval_s: Annotated[float, _Positive] = env_field(
        10.0, "VLLM_MW_CLAIM_INTERVAL_S", "how often to look for dead workers' entries (s)"
    )
    max_deliveries: Annotated[int, _Positive] = env_field(
        10, "VLLM_MW_MAX_DELIVERIES", "deliveries before an entry goes to the dead-letter stream"
    )
    max_record_bytes: Annotated[int, _Positive] = env_field(
        64 * 1024 * 1024,
        "VLLM_MW_MAX_RECORD_BYTES",
        "larger records go to the dead-letter stream",
        shown_default="64 MiB",
    )
    stats_interval_s: Annotated[int, _Positive] = env_field(
        10, "VLLM_MW_STATS_INTERVAL_S", "seconds between file-tree scans"
    )
    file_mode: str = env_field(
        "0640",
        "VLLM_MW_FILE_MODE",
        "mode of the log files this worker creates (octal)",
        allowed="an octal mode with owner read and write",
    )
    dir_mode: str = env_field(
        "0750",
        "VLLM_MW_DIR_MODE",
        "mode of the directories this worker creates (octal)",
        allowed="an octal mode with owner rwx",
    )
    file_idle_s: Annotated[float, _Positive] = env_field(
        300.0,
        "VLLM_MW_FILE_IDLE_S",
        "close a file not written for this long (retention and compression take only files "
        "unchanged for longer)",
    )
    retention_days: Annotated[int, annotated_types.Ge(0)] = env_field(
        0, "VLLM_MW_RETENTION_DAYS", "delete date partitions older than this many days (0: keep)"
    )
    media_grace_days: Annotated[float, annotated_types.Ge(0)] = env_field(
        7.0,
        "VLLM_MW_MEDIA_GRACE_DAYS",
        "retention also deletes media no record references once this old; keep it above the "
        "longest time a record can wait in a spool (0: never delete media)",
    )
    compress: bool = env_field(
        False,
        "VLLM_MW_COMPRESS",
        "gzip closed log files in place, at start-up and hourly (`vllm-mw compress`; one "
        "worker per day)",
    )
    compact: bool = env_field(
        False,
        "VLLM_MW_COMPACT",
        "turn closed days into Parquet, at start-up and hourly (`vllm-mw compact`, needs "
        "`[analytics]`; one worker per day)",
    )
    metrics_port: Annotated[int, annotated_types.Ge(0), annotated_types.Le(65535)] = env_field(
        0, "VLLM_MW_METRICS_PORT", "serve Prometheus `/metrics` on this port (0: off)"
    )
    metrics_addr: str = env_field(
        "0.0.0.0", "VLLM_MW_METRICS_ADDR", "address the metrics server listens on", min_length=1
    )

    _password_file = field_validator("redis_password_file")(check_password_file)

    @field_validator("file_mode", "dir_mode")
    @classmethod
    def _mode(cls, value: str, info: ValidationInfo) -> str:
        try:
            mode = parse_mode(value, str(info.field_name))
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        # The owner must be able to use what it creates, or the writer fails on its own files.
        need = 0o600 if info.field_name == "file_mode" else 0o700
        if mode & need != need:
            raise ValueError(f"{mode:04o} does not give the owner {need:04o}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str, info: ValidationInfo) -> str:
        return with_password(check_redis_url(value), password_of(info))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerConfig:
        """Flags (`overrides` that are not None) over `VLLM_MW_*` variables over defaults."""
        return cls.load(environ, **overrides)

    @property
    def heartbeat_interval_s(self) -> float:
        # Several beats per TTL, so one late beat (a busy loop) is not taken for death.
        return min(5.0, self.heartbeat_ttl_s / 4)

    @property
    def modes(self) -> FileModes:
        return log_modes(self.file_mode, self.dir_mode)

    @property
    def max_bytes(self) -> int:
        return int(self.max_log_size_mb * 1024 * 1024)
