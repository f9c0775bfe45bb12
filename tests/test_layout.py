"""The dependency check: the layering docs/design.md states is the one the code has.

The parts, which modules each holds and which parts each may import are read from the table in
docs/design.md ("How the code is laid out"), so the document cannot drift from the code: a new
import across parts fails here until that table allows it, and a table that allows what no code
does is still a statement this test holds the code to.

Imports are read statically (``ast``) from the source folders that pyproject.toml maps onto the
``filterserve`` namespace, package data included (the stand-in backends and the tokenizer step,
which tritonserver loads by path), and including imports inside functions: a lazy import is still
a dependency, and a cycle through one still makes a module's import order matter.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from filterserve.cli import EXTRAS_MODULES

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SECTION = "## How the code is laid out"
TABLE_HEADER = "| part | modules | may import |"
# What the bare install (``pip install .``) imports: none of them may load a module of an extra.
BARE_MODULES = [
    "filterserve",
    "filterserve.cli",
    "filterserve.client",
    "filterserve.client.cli",
    "filterserve.contract",
    "filterserve.filters",
    "filterserve.filter_loader",
    "filterserve.gate",
]
OTHER_PACKAGES = ["filterserve.export", "filterserve.model_repository", "filterserve.model_repository.runtime",
                  "filterserve.serve", "filterserve.benchmarks"]


def _layering() -> tuple[dict[str, str], dict[str, set[str]]]:
    """From docs/design.md: module-name prefix → part, and part → the parts it may import."""
    text = DESIGN.read_text(encoding="utf-8")
    assert SECTION in text, f"{DESIGN} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    assert TABLE_HEADER in lines, f"the section {SECTION!r} of {DESIGN} has no table {TABLE_HEADER!r}"
    rows = []
    for line in lines[lines.index(TABLE_HEADER) + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    prefixes: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    for part, modules, may_import in rows:
        for prefix in re.findall(r"`([\w.]+)`", modules):
            assert prefix not in prefixes, f"{DESIGN}: {prefix} is in two parts"
            prefixes[prefix] = part
        allowed[part] = {p.strip() for p in may_import.split(",")} - {"—", ""}
    unknown = {p for targets in allowed.values() for p in targets} - set(allowed)
    assert not unknown, f"{DESIGN}: the layering table names no part {sorted(unknown)}"
    return prefixes, allowed


def _source_modules() -> dict[str, Path]:
    """Every module of the declared packages → its source file, through pyproject's package-dir;
    a package's ``*.py`` data files too (``backends/openvino/model.py`` → ``<package>.backends.openvino.model``)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]
    package_data: dict[str, list[str]] = setuptools.get("package-data", {})
    modules = {}
    for package in setuptools["packages"]:
        prefix = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / package_dir[prefix] / Path(*package[len(prefix):].split(".")[1:])
        paths = list(folder.glob("*.py"))
        paths += [path for pattern in package_data.get(package, []) if pattern.endswith(".py") for path in folder.glob(pattern)]
        for path in paths:
            dotted = ".".join(path.relative_to(folder).with_suffix("").parts)
            modules[package if dotted == "__init__" else f"{package}.{dotted}"] = path
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


def _part(module: str, prefixes: dict[str, str]) -> str:
    return prefixes[max((p for p in prefixes if module == p or module.startswith(p + ".")), key=len)]


def _module_graph() -> dict[str, set[str]]:
    modules = _source_modules()
    return {module: _imports(path, set(modules)) - {module} for module, path in modules.items()}


def test_the_layering_table_names_every_part_and_the_modules_are_found():
    prefixes, allowed = _layering()
    assert set(prefixes.values()) == set(allowed)
    modules = _source_modules()
    assert {"filterserve.gate", "filterserve.export.pipeline", "filterserve.client.filter_client",
            "filterserve.model_repository.runtime.backends.openvino.model",
            "filterserve.model_repository.runtime.templates.tokenizer_model"} <= set(modules)
    empty = set(allowed) - {_part(module, prefixes) for module in modules}
    assert not empty, f"parts of {DESIGN} that hold no module: {sorted(empty)}"


def test_each_part_imports_only_what_docs_design_lets_it():
    prefixes, allowed = _layering()
    graph: dict[str, set[str]] = {part: set() for part in allowed}
    violations = []
    for module, imported in sorted(_module_graph().items()):
        for target_module in sorted(imported):
            source, target = _part(module, prefixes), _part(target_module, prefixes)
            if source == target:
                continue
            graph[source].add(target)
            if target not in allowed[source]:
                violations.append(f"{module} ({source}) imports {target_module} ({target}), which {DESIGN.name} does not allow")
    assert not violations, "\n".join(violations)
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        pytest.fail(f"import cycle between parts: {exc.args[1]}")


def test_no_module_imports_itself_back():
    """Across the whole package, imports inside functions counted: filters ↔ filter_folder was one."""
    try:
        TopologicalSorter(_module_graph()).prepare()
    except CycleError as exc:
        pytest.fail(f"import cycle between modules: {' → '.join(exc.args[1])}")


def test_what_runs_without_the_package_imports_none_of_it():
    """The tokenizer step runs in NVIDIA's container, where filterserve is not installed: it and the
    modules the writer copies beside it (contract.py, head_tail.py) import no filterserve module."""
    from filterserve.model_repository.repository import STEP_MODULES, TOKENIZER_TEMPLATE

    modules = _source_modules()
    for path in (TOKENIZER_TEMPLATE, *STEP_MODULES):
        assert not _imports(path, set(modules)), f"{path} imports filterserve, which NVIDIA's container lacks"


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
