"""The package's layers point one way: the core never imports the paper layer or test scaffolding,
and the packages form no import cycle.

The layers are listed here on purpose: a new top-level module or package of ``vlmflow`` fails
:func:`test_every_module_has_a_layer` until it is placed in one.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vlmflow

SRC = Path(vlmflow.__file__).resolve().parent

#: Lowest first; a module may import its own layer and the layers below it, never one above.
LAYERS: dict[str, tuple[str, ...]] = {
    # The toolkit: inputs, positions, model families, the knockout engine, experiments, result
    # tables, the Python API and its figures, distributed runs, tiny random checkpoints.
    "core": (
        "vlmflow", "vlmflow.errors", "vlmflow.notices", "vlmflow.quiet", "vlmflow.settings", "vlmflow.settings_keywords", "vlmflow.load_spec", "vlmflow.aliases", "vlmflow.prompts", "vlmflow.inputs",
        "vlmflow.data", "vlmflow.positions",
        "vlmflow.adapters", "vlmflow.knockout", "vlmflow.loading", "vlmflow.results", "vlmflow.experiments",
        "vlmflow.plots", "vlmflow.distributed", "vlmflow.api", "vlmflow.tiny",
    ),
    # The paper's study on top of the core: claims and their statistics, the study pipeline, the
    # report, the model organism.
    "paper": ("vlmflow.analysis", "vlmflow.study", "vlmflow.report", "vlmflow.organism", "vlmflow.validation"),
    # The command line sits on everything.
    "interface": ("vlmflow.cli", "vlmflow.__main__"),
}  # fmt: skip

#: Never imported by the package: what the tests build their scaffolding from.
TEST_SCAFFOLDING = ("support", "tests", "pytest", "_pytest", "vlmflow.testing")

#: Imports (package -> package) that close a cycle and are still to be removed, with why they are
#: allowed for now. Cycles are checked with these edges taken out; an edge that no longer closes a
#: cycle fails the test, so that it is taken out of this list.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (absolute names)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _layer_of(module: str) -> int | None:
    """Index in LAYERS of the layer ``module`` (a ``vlmflow`` module) belongs to; None: no layer."""
    for index, prefixes in enumerate(LAYERS.values()):
        if module in prefixes or any(module.startswith(p + ".") for p in prefixes if p != "vlmflow"):
            return index
    return None


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _graph() if _layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"


def _wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a layer above the importer's own, and of test scaffolding."""
    names = list(LAYERS)
    wrong = []
    for module, imports in graph.items():
        own = _layer_of(module)
        for target in imports:
            if _in(target, TEST_SCAFFOLDING):
                wrong.append(f"{module} imports test scaffolding {target}")
            elif target.startswith("vlmflow.") and (layer := _layer_of(target)) is not None and layer > own:
                wrong.append(f"{module} ({names[own]}) imports {target} ({names[layer]})")
    return sorted(wrong)


def test_no_module_imports_a_layer_above_its_own_or_test_scaffolding():
    wrong = _wrong_imports(_graph())
    assert not wrong, "\n".join(wrong)


@pytest.fixture(scope="module")
def imported_by_the_core() -> dict[str, list[str]]:
    """In one fresh interpreter: what ``import vlmflow.loading`` imports, then what importing each core
    package and module of :data:`LAYERS` imports (every import of every module, lazy ones too, is
    checked statically above)."""
    core = LAYERS["core"]
    script = (
        "import importlib, json, sys\n"
        "import vlmflow.loading\n"
        "after_loading = sorted(sys.modules)\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'loading': after_loading, 'core': sorted(sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_core_imports_nothing_of_the_paper_layer_or_the_tests(imported_by_the_core):
    above = tuple(p for layer in list(LAYERS.values())[1:] for p in layer)
    leaked = [m for m in imported_by_the_core["core"] if _in(m, (*above, *TEST_SCAFFOLDING))]
    assert not leaked, f"importing the core imported {leaked}"


def test_loading_does_not_import_the_organism(imported_by_the_core):
    assert "vlmflow.loading" in imported_by_the_core["loading"]
    assert "vlmflow.organism" not in imported_by_the_core["loading"]


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _package_cycles(graph: dict[str, set[str]], without: set[tuple[str, str]] = frozenset()) -> set[frozenset[str]]:
    """Strongly connected components (of two or more packages) of the package-level import graph,
    leaving out the edges ``without``."""
    packages = {_package(m) for m in graph}
    edges: dict[str, set[str]] = {p: set() for p in packages}
    for module, imports in graph.items():
        for target in imports:
            if _package(target) in packages and _package(target) != _package(module):
                edges[_package(module)].add(_package(target))
    for source, target in without:
        edges[source].discard(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: set[frozenset[str]] = set()

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                components.add(frozenset(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_packages_import_each_other_in_one_direction_only():
    graph = _graph()
    cycles = _package_cycles(graph, set(KNOWN_CYCLE_EDGES))
    assert not cycles, f"import cycles between packages: {[sorted(c) for c in cycles]}"
    for edge in KNOWN_CYCLE_EDGES:
        others = set(KNOWN_CYCLE_EDGES) - {edge}
        assert any(set(edge) <= c for c in _package_cycles(graph, others)), f"{edge} closes no cycle any more: remove it"


def test_the_checks_see_a_planted_cycle_and_a_planted_upward_import():
    graph = _graph()
    assert not any("vlmflow.results" in c for c in _package_cycles(graph, set(KNOWN_CYCLE_EDGES)))
    # results (core) importing the study (paper), which imports results: a cycle, and an upward import.
    planted = {**graph, "vlmflow.results.store": graph["vlmflow.results.store"] | {"vlmflow.study.directory"}}
    assert any({"vlmflow.results", "vlmflow.study"} <= c for c in _package_cycles(planted, set(KNOWN_CYCLE_EDGES)))
    assert _wrong_imports(planted) == ["vlmflow.results.store (core) imports vlmflow.study.directory (paper)"]
    lazy = {**graph, "vlmflow.loading": graph["vlmflow.loading"] | {"support.tiny_next"}}
    assert _wrong_imports(lazy) == ["vlmflow.loading imports test scaffolding support.tiny_next"]
