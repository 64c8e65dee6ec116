"""Worker settings: defaults, environment (`VLLM_MW_*`) and command-line flags, in that order."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from vllm_middleware import ConfigurationError
from vllm_middleware._modes import FileModes, log_modes

__all__ = ["WorkerConfig"]


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


@dataclass(frozen=True)
class WorkerConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    log_dir: str = "./logs/vllm"
    max_log_size_mb: float = 100.0
    log_format: str = "jsonl"
    stream: str = "vllm:logs"
    #: this worker's name in the consumer group; also names the files it owns
    consumer: str = field(default_factory=_default_consumer)
    #: records per batch at most (one fsync per touched file per batch) ...
    batch_size: int = 4000
    #: ... and bytes per batch at most, whichever comes first (memory: ~3 batches in flight)
    batch_bytes: int = 4 * 1024 * 1024
    block_ms: int = 1000
    fsync: bool = True
    #: a consumer whose heartbeat is older than this is dead: its entries are recovered
    heartbeat_ttl_s: float = 30.0
    #: how often to look for dead consumers' entries
    claim_interval_s: float = 10.0
    #: deliveries after which an entry goes to the dead-letter stream
    max_deliveries: int = 10
    #: larger records go to the dead-letter stream instead of the files
    max_record_bytes: int = 64 * 1024 * 1024
    #: seconds between file-tree scans (file count, total size)
    stats_interval_s: int = 10
    #: permission modes of the log files and directories this worker creates (octal)
    file_mode: str = "0640"
    dir_mode: str = "0750"
    #: close a file not written for this long (retention and compression take only files
    #: unchanged for longer, so never one a worker may still append to)
    file_idle_s: float = 300.0
    #: delete date partitions older than this many days (0: keep everything)
    retention_days: int = 0
    #: serve Prometheus /metrics on this port (0: off)
    metrics_port: int = 0
    metrics_addr: str = "0.0.0.0"

    _ENV = {
        "redis_url": "VLLM_MW_REDIS_URL",
        "log_dir": "VLLM_MW_LOG_DIR",
        "max_log_size_mb": "VLLM_MW_MAX_LOG_SIZE_MB",
        "log_format": "VLLM_MW_LOG_FORMAT",
        "stream": "VLLM_MW_STREAM",
        "consumer": "VLLM_MW_CONSUMER",
        "batch_size": "VLLM_MW_BATCH_SIZE",
        "batch_bytes": "VLLM_MW_BATCH_BYTES",
        "block_ms": "VLLM_MW_BLOCK_MS",
        "fsync": "VLLM_MW_FSYNC",
        "heartbeat_ttl_s": "VLLM_MW_HEARTBEAT_TTL_S",
        "claim_interval_s": "VLLM_MW_CLAIM_INTERVAL_S",
        "max_deliveries": "VLLM_MW_MAX_DELIVERIES",
        "max_record_bytes": "VLLM_MW_MAX_RECORD_BYTES",
        "stats_interval_s": "VLLM_MW_STATS_INTERVAL_S",
        "file_mode": "VLLM_MW_FILE_MODE",
        "dir_mode": "VLLM_MW_DIR_MODE",
        "metrics_port": "VLLM_MW_METRICS_PORT",
        "file_idle_s": "VLLM_MW_FILE_IDLE_S",
        "retention_days": "VLLM_MW_RETENTION_DAYS",
        "metrics_addr": "VLLM_MW_METRICS_ADDR",
    }

    def __post_init__(self) -> None:
        if self.log_format not in ("jsonl", "json"):
            raise ConfigurationError(f"log_format must be jsonl or json, not {self.log_format!r}")
        if min(self.batch_size, self.batch_bytes, self.block_ms, self.max_log_size_mb) <= 0:
            raise ConfigurationError(
                "batch_size, batch_bytes, block_ms and max_log_size_mb must be positive"
            )
        if self.heartbeat_ttl_s <= 0:
            raise ConfigurationError("heartbeat_ttl_s must be positive")
        self.modes  # noqa: B018 - validates file_mode and dir_mode now, not at the first write

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> WorkerConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in cls._ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[name] = _convert(name, raw, str(types[name]), var)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

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


def _convert(name: str, raw: str, type_name: str, var: str) -> Any:
    try:
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes", "on")
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise ConfigurationError(f"{var}={raw!r} is not a valid {type_name} for {name}") from None
    return raw
