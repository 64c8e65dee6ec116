"""Settings are validated once, at construction, with messages that name what is wrong."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vllm_middleware import ConfigurationError, VLLMMiddleware
from vllm_middleware._settings import ClientSettings, settings_table
from vllm_middleware_worker import WorkerConfig

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    ("argument", "value", "allowed"),
    [
        ("flush_interval", math.inf, "> 0"),
        ("flush_interval", math.nan, "> 0"),
        ("max_buffer", math.nan, "integer > 0"),
        ("max_buffer", 0, "integer > 0"),
        ("batch_size", -5, "integer > 0"),
        ("timeout", -1, "> 0"),
        ("timeout", math.inf, "> 0"),
        ("max_log_size_mb", math.nan, "> 0"),
        ("redis_url", "http://x", "redis://"),
        ("redis_url", "localhost:6379", "redis://"),
        ("base_url", "localhost:8000/v1", "http://"),
        ("base_url", "ftp://host/v1", "http://"),
        ("log_format", "xml", "'jsonl', 'json'"),
        ("media_policy", "keep", "'reference'"),
        ("media_min_bytes", -1, ">= 0"),
        ("max_record_bytes", 0, "> 0"),
        ("stream", "", "not empty"),
    ],
)
def test_a_bad_argument_names_itself_its_value_and_the_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argument: str, value: Any, allowed: str
) -> None:
    monkeypatch.delenv("VLLM_MW_REDIS_URL", raising=False)
    with pytest.raises(ConfigurationError) as caught:
        VLLMMiddleware(log_dir=tmp_path, **{argument: value})
    message = str(caught.value)
    assert message.startswith(f"{argument}={value!r} is invalid"), message
    assert allowed in message, message
    assert not any(tmp_path.iterdir()), "a refused client must not have started anything"


@pytest.mark.parametrize(
    ("variable", "raw", "allowed"),
    [
        ("VLLM_MW_REDIS_URL", "http://x", "redis://"),
        ("VLLM_MW_REDIS_TIMEOUT", "nan", "> 0"),
        ("VLLM_MW_REDIS_TIMEOUT", "-1", "> 0"),
        ("VLLM_MW_SPOOL_MAX_MB", "lots", "> 0"),
        ("VLLM_MW_SPOOL", "perhaps", "true or false"),
        ("VLLM_MW_DURABLE", "2", "true or false"),
        ("VLLM_MW_EMBEDDED_WRITER", "fork", "'process'"),
    ],
)
def test_a_bad_environment_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ConfigurationError) as caught:
        VLLMMiddleware(log_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{variable}={raw!r} is invalid"), message
    assert allowed in message, message


def test_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MW_REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("VLLM_MW_DURABLE", "yes")
    monkeypatch.setenv("VLLM_MW_SPOOL_MAX_MB", "12.5")
    settings = ClientSettings.load()
    assert settings.redis_url == "redis://example:6379/0" and settings.durable
    assert settings.shipping().spool_max_mb == 12.5 and settings.shipping().durable
    forced = ClientSettings.load(redis_url="", durable=False)
    assert forced.redis_url is None and not forced.durable


def test_passwords_never_appear_in_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MW_REDIS_URL", "redis://:s3cret@host:notaport/0")
    with pytest.raises(ConfigurationError) as caught:
        ClientSettings.load()
    assert "s3cret" not in str(caught.value) and ":***@" in str(caught.value)
    assert "tok3n" not in repr(ClientSettings.load(redis_url="", api_key="tok3n"))


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("VLLM_MW_MAX_RECORD_BYTES", "0"),
        ("VLLM_MW_MAX_DELIVERIES", "0"),
        ("VLLM_MW_MAX_DELIVERIES", "-3"),
        ("VLLM_MW_CLAIM_INTERVAL_S", "-1"),
        ("VLLM_MW_HEARTBEAT_TTL_S", "nan"),
        ("VLLM_MW_HEARTBEAT_TTL_S", "inf"),
        ("VLLM_MW_BLOCK_MS", "0"),
        ("VLLM_MW_BATCH_BYTES", "1.5"),
        ("VLLM_MW_STATS_INTERVAL_S", "0"),
        ("VLLM_MW_FSYNC", "sometimes"),
        ("VLLM_MW_LOG_FORMAT", "xml"),
        ("VLLM_MW_REDIS_URL", "127.0.0.1:6379"),
    ],
)
def test_worker_refuses_bad_variables(variable: str, raw: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"{variable}={raw!r} is invalid")):
        WorkerConfig.from_env({variable: raw})


def test_worker_flags_override_variables_and_are_checked_too() -> None:
    config = WorkerConfig.from_env({"VLLM_MW_BATCH_SIZE": "7"}, batch_size=None)
    assert config.batch_size == 7
    assert WorkerConfig.from_env({"VLLM_MW_BATCH_SIZE": "7"}, batch_size=9).batch_size == 9
    with pytest.raises(ConfigurationError, match=r"^batch_size=0 is invalid"):
        WorkerConfig.from_env({}, batch_size=0)
    with pytest.raises(ConfigurationError, match=r"^max_deliveries=0 is invalid"):
        WorkerConfig(max_deliveries=0)


def test_worker_start_with_a_bad_variable_is_one_line_and_exits_non_zero(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MW_")}
    env["VLLM_MW_HEARTBEAT_TTL_S"] = "nan"
    result = subprocess.run(
        [sys.executable, "-m", "vllm_middleware._cli", "worker", "--log-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "VLLM_MW_HEARTBEAT_TTL_S='nan' is invalid" in lines[0]


def _readme_table(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = f"<!-- settings:{marker} (generated) -->\n"
    end = f"<!-- /settings:{marker} -->"
    assert start in text and end in text, f"README lacks the {marker} settings markers"
    return text.split(start, 1)[1].split(end, 1)[0]


@pytest.mark.parametrize(
    ("marker", "model"), [("client", ClientSettings), ("worker", WorkerConfig)]
)
def test_readme_configuration_tables_are_the_models(marker: str, model: Any) -> None:
    # Regenerate with: python -m vllm_middleware._settings --readme README.md
    assert _readme_table(marker) == settings_table(model)
