"""Settings, validated once with pydantic: the client's, and the tools to describe any model.

Every constructor argument and every `VLLM_MW_*` variable the client reads is a field of
`ClientSettings`, with its range. A bad value raises `ConfigurationError` naming the setting
(the argument, or the environment variable it came from), the value and what is allowed. This
runs when a client is built, never per request: the client copies the values into plain
attributes. The README's configuration tables are rendered from these models
(`settings_table`), and a test checks that they agree.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo

from ._exceptions import ConfigurationError
from ._modes import parse_mode
from ._redis_url import (
    check_password_file,
    check_redis_url,
    mask_url,
    password_of,
    with_password,
)
from ._sinks._shipping import ShippingSettings

__all__ = [
    "ClientSettings",
    "EnvSettings",
    "env_field",
    "redis_password_field",
    "redis_password_file_field",
    "settings_table",
]

_Model = TypeVar("_Model", bound="EnvSettings")

HTTP_SCHEMES = ("http", "https")


def env_field(default: Any, env: str | None, description: str, **kwargs: Any) -> Any:
    """A field that may come from environment variable `env`; `description` goes to the README."""
    extra: dict[str, Any] = {"env": env} if env else {}
    shown = kwargs.pop("shown_default", None)
    if shown is not None:
        extra["shown_default"] = shown
    allowed = kwargs.pop("allowed", None)
    if allowed is not None:
        extra["allowed"] = allowed
    if callable(default):
        return Field(
            default_factory=default, description=description, json_schema_extra=extra, **kwargs
        )
    return Field(default=default, description=description, json_schema_extra=extra, **kwargs)


def redis_password_field() -> Any:
    """The Redis password setting, the same for the client and the worker."""
    return env_field(
        None,
        "VLLM_MW_REDIS_PASSWORD",
        "Redis password, when the URL has none (kept out of argv, where `ps` shows it)",
        repr=False,
    )


def redis_password_file_field() -> Any:
    """The Redis password file setting, the same for the client and the worker."""
    return env_field(
        None,
        "VLLM_MW_REDIS_PASSWORD_FILE",
        "a file holding the Redis password (a mounted secret)",
        allowed="a readable file",
    )


# Where each value of the model being built came from (field -> variable), for its messages.
_labels: ContextVar[Mapping[str, str] | None] = ContextVar("_labels", default=None)


class EnvSettings(BaseModel):
    """A frozen settings model whose fields may come from `VLLM_MW_*` variables."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, validate_default=False
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _configuration_error(type(self), exc, _labels.get() or {}) from None

    @classmethod
    def env_names(cls) -> dict[str, str]:
        names = {}
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and isinstance(extra.get("env"), str):
                names[name] = str(extra["env"])
        return names

    @classmethod
    def load(
        cls: type[_Model], environ: Mapping[str, str] | None = None, **arguments: Any
    ) -> _Model:
        """Arguments (those not None) over the environment over the defaults, validated.

        Raises `ConfigurationError` naming the argument or variable that holds a bad value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for name, var in cls.env_names().items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[name] = raw.strip()
                labels[name] = var
        for name, value in arguments.items():
            if value is not None:
                values[name] = value
                labels.pop(name, None)
        token = _labels.set(labels)
        try:
            return cls(**values)
        finally:
            _labels.reset(token)


def _configuration_error(
    model: type[BaseModel], exc: ValidationError, labels: Mapping[str, str]
) -> ConfigurationError:
    problems = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else "settings"
        label = labels.get(name, name)
        info = model.model_fields.get(name)
        allowed = describe_allowed(info) if info is not None else ""
        reason = str(error["msg"])
        if error["type"] == "value_error":
            reason = reason.removeprefix("Value error, ")
        value = error.get("input")
        if name in _SECRET:
            value = "***"
        elif isinstance(value, str):
            value = mask_url(value)
        text = f"{label}={value!r} is invalid: {reason}"
        if allowed:
            text += f" (allowed: {allowed})"
        problems.append(text)
    return ConfigurationError("; ".join(problems))


_SECRET = frozenset({"api_key", "redis_password"})

_KINDS: dict[Any, str] = {
    int: "an integer",
    float: "a finite number",
    bool: "true or false (1/0, yes/no, on/off)",
    str: "text",
}


def _plain_types(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _plain_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found: list[Any] = []
        for arg in typing.get_args(annotation):
            found += _plain_types(arg)
        return found
    return [annotation]


def describe_allowed(info: FieldInfo) -> str:
    """What a field accepts, in words: `an integer > 0`, `one of 'jsonl', 'json'`, ..."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "allowed" in extra:
        return str(extra["allowed"])
    kinds = []
    for plain in _plain_types(info.annotation):
        if plain is type(None):
            continue
        if typing.get_origin(plain) is Literal:
            kinds.append("one of " + ", ".join(repr(v) for v in typing.get_args(plain)))
        else:
            kinds.append(_KINDS.get(plain, getattr(plain, "__name__", str(plain))))
    bounds = []
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            bounds.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            bounds.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            bounds.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            bounds.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            bounds.append("not empty")
    text = " or ".join(kinds)
    return f"{text} {' and '.join(bounds)}".strip()


def _shown_default(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    if info.default_factory is not None:
        return "(computed)"
    default = info.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, str):
        return f"`{default}`"
    return f"{default:,}" if isinstance(default, int) else str(default)


def settings_table(model: type[EnvSettings], *, include: Any = None) -> str:
    """The README's Markdown table for `model`: one row per field, from the model itself."""
    include = include or (lambda name, info: True)
    rows = [
        "| setting | environment | default | allowed | |",
        "|---|---|---|---|---|",
    ]
    env = model.env_names()
    for name, info in model.model_fields.items():
        if not include(name, info):
            continue
        variable = f"`{env[name]}`" if name in env else ""
        description = (info.description or "").replace("|", "\\|")
        allowed = describe_allowed(info).replace("|", "\\|")
        rows.append(
            f"| `{name}` | {variable} | {_shown_default(info)} | {allowed} | {description} |"
        )
    return "\n".join(rows) + "\n"


PositiveInt = Annotated[int, annotated_types.Gt(0)]
PositiveFloat = Annotated[float, annotated_types.Gt(0)]


class ClientSettings(EnvSettings):
    """Everything `VLLMMiddleware(...)` accepts or reads from the environment, with its range.

    `redis_client`, `http_client` and `metadata` are objects, not settings: the client takes
    them as they are.
    """

    base_url: str = env_field(
        "http://localhost:8081/v1",
        None,
        "the server's OpenAI-compatible API root (usually ends in `/v1`)",
        allowed="an http:// or https:// URL with a host",
    )
    log_dir: str = env_field("./logs/vllm", None, "root of the partitioned log tree")
    enable_file_logging: bool = env_field(True, None, "off: calls are made, nothing is logged")
    log_format: Literal["jsonl", "json"] = env_field(
        "jsonl",
        None,
        "`json`: each record pretty-printed (DuckDB: `format='unstructured'`)",
    )
    max_log_size_mb: PositiveFloat = env_field(100.0, None, "rotate files at this size")
    redis_password: str | None = redis_password_field()
    redis_password_file: str | None = redis_password_file_field()
    redis_url: str | None = env_field(
        None,
        "VLLM_MW_REDIS_URL",
        'Redis mode; `""` forces the embedded mode even when the variable is set',
        allowed="a redis://, rediss:// or unix:// URL, or empty",
        validate_default=True,  # applies VLLM_MW_REDIS_PASSWORD(_FILE)
        repr=False,
    )
    stream: str = env_field(
        "vllm:logs", None, "stream key (workers must use the same)", min_length=1
    )
    host: str | None = env_field(
        None,
        "VLLM_MW_HOST",
        "the partition's `host=` (default: the hostname)",
        shown_default="hostname",
    )
    api_key: str | None = env_field(None, None, "sent as `Authorization: Bearer`", repr=False)
    timeout: PositiveFloat = env_field(
        600.0,
        None,
        "seconds per HTTP call (or an `httpx.Timeout`)",
        allowed="a finite number > 0, or an httpx.Timeout",
    )
    max_buffer: PositiveInt = env_field(
        50_000, None, "records held in memory at most; beyond, dropped and counted"
    )
    batch_size: PositiveInt = env_field(500, None, "records per flush at most")
    flush_interval: PositiveFloat = env_field(0.05, None, "seconds a partial batch may wait")
    fsync: bool = env_field(True, None, "embedded mode: fsync each batch")
    durable: bool = env_field(
        False, "VLLM_MW_DURABLE", "each call returns once its record is durable"
    )
    media_policy: Literal["reference", "drop", "inline"] = env_field(
        "reference", None, "base64 media: to files, dropped, or kept in the record"
    )
    media_dir: str | None = env_field(
        None,
        None,
        "where `reference` writes media (default `log_dir/media`; Redis mode: must be shared)",
    )
    media_min_bytes: Annotated[int, annotated_types.Ge(0)] = env_field(
        1024, None, "smaller blobs stay inline"
    )
    max_record_bytes: PositiveInt = env_field(
        8 * 1024 * 1024,
        None,
        "larger encoded records are replaced by their metadata and a `truncated` note",
        shown_default="8 MiB",
    )
    redis_timeout: PositiveFloat = env_field(
        2.0,
        "VLLM_MW_REDIS_TIMEOUT",
        "seconds one Redis flush may take before the batch goes to the spool",
    )
    spool: bool = env_field(True, "VLLM_MW_SPOOL", "spool batches Redis does not take")
    spool_dir: str | None = env_field(
        None,
        "VLLM_MW_SPOOL_DIR",
        "spool root",
        shown_default="`~/.cache/vllm-middleware/spool`",
    )
    spool_max_mb: PositiveFloat = env_field(
        1024.0, "VLLM_MW_SPOOL_MAX_MB", "spool size bound; beyond it records are dropped, counted"
    )
    embedded_writer: Literal["auto", "process", "thread"] = env_field(
        "auto",
        "VLLM_MW_EMBEDDED_WRITER",
        "who writes the embedded files: a writer process beside the app, or a thread",
    )
    file_mode: int | str | None = env_field(
        None,
        "VLLM_MW_FILE_MODE",
        "mode of the log and media files the client creates (records hold prompts and answers)",
        shown_default="`0640`",
        allowed="an octal mode with owner read and write",
    )
    dir_mode: int | str | None = env_field(
        None,
        "VLLM_MW_DIR_MODE",
        "mode of the directories the client creates under `log_dir` and `media_dir`",
        shown_default="`0750`",
        allowed="an octal mode with owner rwx",
    )
    content: Literal["full", "metadata"] = env_field(
        "full",
        None,
        "`metadata`: keep model, parameters, usage, latency, error, tool names and sizes, no text",
    )
    sample_rate: Annotated[float, annotated_types.Ge(0), annotated_types.Le(1)] = env_field(
        1.0, None, "share of successful calls recorded (by request id; errors always kept)"
    )

    def shipping(self) -> ShippingSettings:
        """The shipper's settings: every value from here, none read again from the environment."""
        return ShippingSettings(
            max_buffer=self.max_buffer,
            batch_size=self.batch_size,
            flush_interval=self.flush_interval,
            spool=self.spool,
            spool_dir=self.spool_dir,
            spool_max_mb=self.spool_max_mb,
            redis_timeout=self.redis_timeout,
            durable=self.durable,
            embedded_writer=self.embedded_writer,
        )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
        except ValueError as exc:
            raise ValueError(f"not a URL ({exc})") from None
        if parts.scheme not in HTTP_SCHEMES or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    _password_file = field_validator("redis_password_file")(check_password_file)

    @field_validator("file_mode", "dir_mode")
    @classmethod
    def _mode(cls, value: int | str | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        try:
            return parse_mode(value, str(info.field_name))
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return None
        return with_password(check_redis_url(value), password_of(info))


def readme_tables() -> dict[str, str]:
    """The generated README tables by marker name (the worker's when it is installed)."""
    tables = {"client": settings_table(ClientSettings)}
    try:
        worker = importlib.import_module("vllm_middleware_worker._config")
    except ImportError:  # the worker is an optional extra that imports this package
        return tables
    tables["worker"] = settings_table(worker.WorkerConfig)
    return tables


def rewrite_readme(text: str) -> str:
    """`text` with each `<!-- settings:NAME (generated) -->` block replaced by its table."""
    for name, table in readme_tables().items():
        start = f"<!-- settings:{name} (generated) -->\n"
        end = f"<!-- /settings:{name} -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + start + table + end + rest.split(end, 1)[1]
    return text


def _main(argv: list[str]) -> int:
    """`python -m vllm_middleware._settings [--readme README.md]`: print or update the tables."""
    if len(argv) == 2 and argv[0] == "--readme":
        path = Path(argv[1])
        path.write_text(rewrite_readme(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    for name, table in readme_tables().items():
        sys.stdout.write(f"{name}:\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
