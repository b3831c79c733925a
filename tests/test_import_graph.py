"""The import graph of ``hrad`` has no cycles.

Two checks, both parsing every module with ``ast`` and skipping imports under
``if TYPE_CHECKING:`` (never executed):

- module-level imports: no cycle between any two modules;
- module-level and function-level imports together (a function-level import that closes a
  cycle only hides it), with modules collapsed into their layer (``hrad.detectors``,
  ``hrad.strategies``, ``hrad.model``, ...): no cycle between layers. A lazy import inside one
  layer (``hrad.features.base`` building the optional OpenVINO wrapper) is allowed;
- the same layer graph against :data:`LAYER_ORDER`, the bottom-up order ARCHITECTURE.md states:
  every layer imports only layers below its own tier (so an upward import fails even when
  nothing imports back), and every module of ``hrad`` has a tier (a new one must be placed,
  here and in ARCHITECTURE.md).

``from hrad.a import b`` is an edge to ``hrad.a.b`` when that is a module, else to ``hrad.a``;
importing ``hrad.a.b`` also runs the package ``hrad.a`` (its ``__init__``), so that is an edge
too, except to the importer's own packages (a package's ``__init__`` importing its submodules is
how packages work).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hrad"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, module: str, is_package: bool, nested: bool = True) -> list[str]:
    """Every hrad name an import statement in ``tree`` names (TYPE_CHECKING blocks skipped); with
    ``nested=False`` only module-level statements (not inside functions or classes)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for statement in node.orelse:
                visit(statement)
            return
        if not nested and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in names if name == "hrad" or name.startswith("hrad.")]


@functools.cache
def import_graph(nested: bool = True) -> dict[str, frozenset[str]]:
    """Module -> the hrad modules it imports (parsed once per ``nested``; read-only)."""
    paths = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        own_packages = {".".join(name.split(".")[:index]) for index in range(1, name.count(".") + 1)}
        for target in imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py", nested):
            if target not in paths:
                continue  # "from hrad.a import function": the module hrad.a is named too
            parts = target.split(".")
            for index in range(1, len(parts) + 1):  # the target and every package above it
                node = ".".join(parts[:index])
                if node in paths and node != name and node not in own_packages:
                    graph[name].add(node)
    return {name: frozenset(targets) for name, targets in graph.items()}


def cycles(graph: Mapping[str, AbstractSet[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_checker_finds_a_cycle_and_reads_function_level_imports() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from hrad.model import AnomalyModel\n"
        "def f():\n    from hrad.errors import InputError\n"
        "from . import base\n"
    )
    assert imported_names(tree, "hrad.detectors.knn", False) == [
        "hrad.errors",
        "hrad.errors.InputError",
        "hrad.detectors",
        "hrad.detectors.base",
    ]
    assert imported_names(tree, "hrad.detectors.knn", False, nested=False) == [
        "hrad.detectors",
        "hrad.detectors.base",
    ]


#: cycles that exist and are owned elsewhere; each entry must still exist (the test says when to
#: drop it)
KNOWN_LAYER_CYCLES: list[list[str]] = []


def layer(module: str) -> str:
    """``hrad.detectors.knn`` -> ``hrad.detectors``; top-level modules are their own layer."""
    return ".".join(module.split(".")[:2])


def layer_graph() -> dict[str, set[str]]:
    """Layer -> the other layers it imports, function-level imports included."""
    layers: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        layers.setdefault(layer(module), set()).update(
            layer(target) for target in targets if layer(target) != layer(module)
        )
    return layers


def test_no_module_level_import_cycles() -> None:
    graph = import_graph(nested=False)
    assert "hrad.runners" in graph["hrad.strategies.ensemble"]
    assert cycles(graph) == []


def test_no_import_cycles_between_layers_counting_function_level_imports() -> None:
    layers = layer_graph()
    layers.pop("hrad", None)  # the package itself (hrad/__init__.py) re-exports the top layer
    layers = {name: {target for target in targets if target != "hrad"} for name, targets in layers.items()}
    assert "hrad.model" in layers["hrad.distributed"] or "hrad.runners" in layers["hrad.distributed"]
    found = cycles(layers)
    assert [cycle for cycle in found if cycle not in KNOWN_LAYER_CYCLES] == []
    assert [cycle for cycle in KNOWN_LAYER_CYCLES if cycle not in found] == [], (
        "a known cycle is gone: drop it"
    )


#: the layers bottom-up, as ARCHITECTURE.md lists them: a layer may import only layers of an earlier
#: tier (a tier's members are independent of each other)
LAYER_ORDER: list[tuple[str, ...]] = [
    ("hrad.errors", "hrad.version", "hrad.progress", "hrad.strict_json", "hrad.staging", "hrad.seeds"),
    (
        "hrad.registry",
        "hrad.imaging",
        "hrad.tile_geometry",
        "hrad.hiad_math",
        "hrad.runners",
        "hrad.prediction",
        "hrad.pipeline",
        "hrad.profiling",
        "hrad.service_page",
        "hrad.openvino_core",
    ),
    ("hrad.data",),
    ("hrad.features",),
    ("hrad.detectors",),
    ("hrad.postprocess",),
    ("hrad.strategies",),
    ("hrad.metrics",),
    ("hrad.reports",),
    ("hrad.config", "hrad.artifact", "hrad.outputs", "hrad.export_runtime", "hrad.comparison"),
    ("hrad.model", "hrad.options", "hrad.export_graph"),
    ("hrad.loading",),
    (
        "hrad.export_ensemble",
        "hrad.export_mrf",
        "hrad.export_hiad",
        "hrad.distributed",
        "hrad.evaluation",
        "hrad.ad2",
        "hrad.service",
        "hrad.tracking",
    ),
    ("hrad.export",),
    ("hrad.cli",),
    ("hrad.__main__",),
    ("hrad",),
]


def upward_imports(layers: Mapping[str, AbstractSet[str]], order: list[tuple[str, ...]]) -> list[str]:
    """``"a -> b"`` for every import of a layer that is not in an earlier tier than the importer."""
    tier = {name: index for index, names in enumerate(order) for name in names}
    return [
        f"{source} -> {target}"
        for source, targets in sorted(layers.items())
        for target in sorted(targets)
        if tier[target] >= tier[source]
    ]


def test_the_order_check_finds_an_upward_import_without_a_cycle() -> None:
    order = [("low",), ("mid", "side"), ("high",)]
    assert upward_imports({"low": set(), "mid": {"low"}, "high": {"mid", "low"}}, order) == []
    assert upward_imports({"low": {"high"}, "mid": {"side"}, "high": set()}, order) == [
        "low -> high",
        "mid -> side",
    ]


def test_layers_import_only_lower_layers_in_the_documented_order() -> None:
    layers = layer_graph()
    placed = {name for names in LAYER_ORDER for name in names}
    assert sorted(set(layers) - placed) == [], (
        "a new module: give it a tier in LAYER_ORDER and place it in ARCHITECTURE.md"
    )
    assert sorted(placed - set(layers)) == [], "a module is gone: drop it from LAYER_ORDER"
    assert "hrad.postprocess" in layers["hrad.strategies"]  # the graph is read (a real edge is seen)
    assert upward_imports(layers, LAYER_ORDER) == []


def test_architecture_places_every_module() -> None:
    """Every top-level module and package of ``hrad`` is named in ARCHITECTURE.md as ``hrad/<name>``."""
    text = (ROOT.parent / "ARCHITECTURE.md").read_text()
    entries = [
        path
        for path in ROOT.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    ]
    names = [f"hrad/{path.stem}.py" if path.is_file() else f"hrad/{path.name}/" for path in entries]
    assert sorted(name for name in names if f"`{name}`" not in text) == []


@pytest.mark.parametrize("module", ["hrad.runners", "hrad.errors", "hrad.imaging", "hrad.tile_geometry"])
def test_runners_import_nothing_above_errors(module: str) -> None:
    assert import_graph()[module] <= {"hrad.errors"}
