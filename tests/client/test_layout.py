"""The package layout: what the client imports, what it exports, and where the tests live."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import vllm_middleware

CLIENT = Path(vllm_middleware.__file__).parent
# Packages the client must never import: the worker depends on the client (never the reverse)
# and test doubles are not product code.
FORBIDDEN = ("vllm_middleware_testing", "vllm_middleware_worker")


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved (`path` is in a package)."""
    package = [path.parent.name]
    for parent in path.parent.parents:
        if not (parent / "__init__.py").exists():
            break
        package.insert(0, parent.name)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import's package, resolved against the client's own tree.
            module = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{module}" if module else base
            names.add(module)
    return names


def test_the_client_imports_neither_the_worker_nor_the_test_doubles() -> None:
    offenders = {
        f"{path.relative_to(CLIENT)}: {name}"
        for path in CLIENT.rglob("*.py")
        for name in _imported_modules(path)
        if name.split(".")[0] in FORBIDDEN or ".testing" in name
    }
    assert not offenders
    assert not (CLIENT / "testing").exists()


def test_importing_every_client_module_loads_neither() -> None:
    modules = sorted(
        "vllm_middleware." + ".".join(path.relative_to(CLIENT).with_suffix("").parts)
        for path in CLIENT.rglob("*.py")
        if path.name != "__init__.py" and path.stem != "__main__"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def _ruff_order(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize(
    "module_name", ["vllm_middleware", "vllm_middleware.storage", "vllm_middleware_testing"]
)
def test_all_is_sorted_complete_and_importable(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = list(module.__all__)
    assert exported == sorted(exported, key=_ruff_order)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    # Every public name is exported on purpose, and every export exists.
    assert set(exported) == public
    namespace: dict[str, object] = {}
    exec(f"from {module_name} import *", namespace)
    assert set(exported) <= set(namespace)


def test_the_storage_contract_is_not_a_user_export() -> None:
    storage = importlib.import_module("vllm_middleware.storage")
    assert not set(storage.__all__) & set(vllm_middleware.__all__)
    for name in ("PartitionWriter", "RecordEntry", "StreamKeys", "partition_dir"):
        assert not hasattr(vllm_middleware, name)


def test_the_worker_reads_the_storage_contract_from_one_module() -> None:
    storage_modules = {"_keys", "_modes", "_partition", "_record"}
    worker = Path(importlib.import_module("vllm_middleware_worker").__file__ or "").parent
    offenders = {
        f"{path.name}: {name}"
        for path in worker.rglob("*.py")
        for name in _imported_modules(path)
        if name.startswith("vllm_middleware.") and name.split(".")[1] in storage_modules
    }
    assert not offenders


def test_only_the_demo_command_loads_the_test_doubles() -> None:
    code = (
        "import sys\n"
        "from vllm_middleware._cli import _parser\n"
        "_parser(['--traceback', 'stats'])\n"
        "print('vllm_middleware_testing' in sys.modules)\n"
        "_parser(['demo', '--embedded'])\n"
        "print('vllm_middleware_testing' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split() == ["False", "True"]


TESTS = Path(__file__).resolve().parents[1]
# The test tree mirrors the code: the client library, the worker, the two together, the doubles.
TEST_DIRS = {"client", "worker", "pipeline", "fakes"}


def test_tests_live_in_the_directory_of_what_they_test() -> None:
    assert sorted(path.name for path in TESTS.glob("test_*.py")) == []
    folders = {
        path.name for path in TESTS.iterdir() if path.is_dir() and any(path.glob("test_*.py"))
    }
    assert folders == TEST_DIRS


def test_test_directories_are_packages_with_unique_module_names() -> None:
    # Packages, so the module names are tests.client.test_x; unique basenames besides, so a
    # test is found by its file name alone and a move between directories keeps the name.
    assert (TESTS / "__init__.py").exists()
    for name in TEST_DIRS:
        assert (TESTS / name / "__init__.py").exists(), name
    names = [path.name for path in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
