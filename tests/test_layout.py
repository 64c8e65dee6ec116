"""The package layout: what the client imports, and what it exports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vllm_middleware

CLIENT = Path(vllm_middleware.__file__).parent
# Packages the client must never import: the worker depends on the client (never the reverse)
# and test doubles are not product code.
FORBIDDEN = ("vllm_middleware_testing", "vllm_middleware_worker")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import's package, resolved against the client's own tree.
            module = node.module or ""
            if node.level:
                package = path.parent.relative_to(CLIENT.parent).parts
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
