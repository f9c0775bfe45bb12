"""The dependency check: which part of filterserve may import which, and the bare client stays light.

The flow is core → export → model_repository → serve → client → benchmarks. A part imports core
and only the parts it needs for its own step, never one further down the flow, so each can be read,
tested and installed without what comes after it:

- core (``filterserve/*.py``: filters, contract, errors, gate, progress, and the sample data)
  imports no other part;
- model_repository is the on-disk format: it imports core only, because both the export (which
  writes it) and the server (which reads it) import it;
- export imports core and model_repository: never benchmarks, serve or client;
- serve imports core and model_repository;
- client imports core only: it is the bare install, which has no torch;
- benchmarks, and the entry points ``filterserve.cli`` and ``filterserve.demo``, drive every part.

Imports are read statically (``ast``) from the source folders that pyproject.toml maps onto the
``filterserve`` namespace, including imports inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from filterserve.cli import EXTRAS_MODULES

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PARTS = {  # import-name prefix → part; the longest matching prefix wins
    "filterserve": "core",
    "filterserve.export": "export",
    "filterserve.model_repository": "model_repository",
    "filterserve.serve": "serve",
    "filterserve.client": "client",
    "filterserve.benchmarks": "benchmarks",
    "filterserve.cli": "entry",
    "filterserve.demo": "entry",
}
ALLOWED = {
    "core": set(),
    "model_repository": {"core"},
    "export": {"core", "model_repository"},
    "serve": {"core", "model_repository"},
    "client": {"core"},
    "benchmarks": {"core", "export", "model_repository", "serve", "client"},
    "entry": {"core", "export", "model_repository", "serve", "client", "benchmarks"},
}
# What the bare install (``pip install .``) imports: none of them may load a module of an extra.
BARE_MODULES = [
    "filterserve",
    "filterserve.cli",
    "filterserve.client",
    "filterserve.client.cli",
    "filterserve.contract",
    "filterserve.filters",
    "filterserve.gate",
]
OTHER_PACKAGES = ["filterserve.export", "filterserve.model_repository", "filterserve.serve", "filterserve.benchmarks"]


def _source_modules() -> dict[str, Path]:
    """Every module of the declared packages → its source file, through pyproject's package-dir."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]
    modules = {}
    for package in setuptools["packages"]:
        prefix = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / package_dir[prefix] / Path(*package[len(prefix):].split(".")[1:])
        for path in folder.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _imports(path: Path, known: set[str]) -> set[str]:
    """The filterserve modules a file imports (``from filterserve import contract`` → filterserve.contract)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # The source folders are not the import names (export/ is filterserve.export): a
            # relative import would hide that, so the code base uses absolute ones only.
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            base = node.module or ""
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {name for name in found if name == "filterserve" or name.startswith("filterserve.")}


def _part(module: str) -> str:
    return PARTS[max((p for p in PARTS if module == p or module.startswith(p + ".")), key=len)]


def test_each_part_imports_only_what_it_may_and_there_is_no_cycle():
    modules = _source_modules()
    assert {"filterserve.gate", "filterserve.export.pipeline", "filterserve.client.filter_client"} <= set(modules)
    graph: dict[str, set[str]] = {part: set() for part in ALLOWED}
    violations = []
    for module, path in sorted(modules.items()):
        for imported in sorted(_imports(path, set(modules))):
            source, target = _part(module), _part(imported)
            if source == target:
                continue
            graph[source].add(target)
            if target not in ALLOWED[source]:
                violations.append(f"{module} ({source}) imports {imported} ({target})")
    assert not violations, "\n".join(violations)
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        pytest.fail(f"import cycle between parts: {exc.args[1]}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("module", BARE_MODULES + OTHER_PACKAGES)
def test_each_package_imports_alone_and_the_bare_ones_load_no_extra(module: str, tmp_path: Path):
    """A fresh interpreter per module: an order-dependent (circular) import fails here. The extras
    are installed, so a heavy import in a bare module shows even though it would succeed."""
    probe = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    # Outside the checkout: the working directory comes first on sys.path, and the source
    # folder filterserve/ would shadow the installed namespace that maps export/, client/, ...
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, f"import {module} failed on its own:\n{done.stderr[-3000:]}"
    if module in BARE_MODULES:
        extras = {name.split(".")[0] for name in json.loads(done.stdout)} & EXTRAS_MODULES
        assert not extras, f"{module} loads {sorted(extras)}"
