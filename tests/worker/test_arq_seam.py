"""What the worker's `ResilientWorker` relies on in arq's private API, checked on the arq the
tests run with (CI installs the newest that pyproject.toml allows)."""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

arq_worker = pytest.importorskip("arq.worker")

from vllm_middleware_worker import WorkerConfig, make_worker_settings  # noqa: E402
from vllm_middleware_worker._service import resilient_worker_class  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _arq_requirement(extra: str) -> Requirement:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    (line,) = (r for r in project["optional-dependencies"][extra] if r.startswith("arq"))
    return Requirement(line)


def test_the_installed_arq_is_in_the_bounded_range() -> None:
    worker, test = _arq_requirement("worker"), _arq_requirement("test")
    assert worker.specifier == test.specifier
    # An upper bound: the override was read against these versions only.
    assert any(spec.operator == "<" for spec in worker.specifier)
    assert worker.specifier.contains(version("arq"))


def test_the_private_methods_overridden_still_exist() -> None:
    for name in ("_poll_iteration", "close"):
        method = getattr(arq_worker.Worker, name)
        assert inspect.iscoroutinefunction(method)
        assert list(inspect.signature(method).parameters) == ["self"]
    resilient = resilient_worker_class()
    assert resilient._poll_iteration is not arq_worker.Worker._poll_iteration


def test_the_private_state_read_by_close_exists(tmp_path: Path) -> None:
    config = WorkerConfig(redis_url="redis://127.0.0.1:1/0", log_dir=str(tmp_path))
    kwargs = arq_worker.get_kwargs(make_worker_settings(config))
    worker = resilient_worker_class()(**kwargs, handle_signals=False)
    assert worker._handle_signals is False
    assert worker._pool is None  # no connection before `main`
    assert worker.tasks == {}
    assert isinstance(worker.health_check_key, str)
    assert worker.on_shutdown is not None and callable(worker.handle_sig)
