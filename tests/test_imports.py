"""The library's imports go one way (README "Where to start reading", docs/architecture.md "The layers"): each module
imports only modules of its own layer or of layers above it, and no module imports, directly or through others, a
module that imports it back. A package's ``__init__`` re-exporting its own submodules is not a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx

PACKAGE = Path(__file__).resolve().parents[1] / "gevit_lib"
# The layers of docs/architecture.md's picture, top first (by the module or subpackage below gevit_lib).
LAYERS = [{"files"}, {"groups"}, {"nn"}, {"hub"}, {"models"},
          {"data", "posthoc", "canonical", "train", "checkpointing", "distributed", "augment", "equivariance",
           "benchmark", "viz"},
          {"profiles", "recipes", "post_results"}, {"notebook", "testing"}, {"run", "reproduce"}]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the gevit_lib modules it imports (anywhere in its file, also inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: strip level - 1 parts from the importing package
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # "from pkg import module"
        edges = set()
        for target in targets:
            while target and target not in files:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name and not (path.name == "__init__.py" and target.startswith(name + ".")):
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (networkx, a torch dependency)."""
    components = networkx.strongly_connected_components(networkx.DiGraph(
        [(m, t) for m, targets in graph.items() for t in targets]))
    return sorted(sorted(c) for c in components if len(c) > 1)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_import_graph_sees_relative_and_absolute_imports() -> None:
    graph = _import_graph()
    assert "gevit_lib.groups" in graph["gevit_lib.nn.attention"]  # from ..groups import ...
    assert "gevit_lib.posthoc" in graph["gevit_lib.canonical"]  # from gevit_lib.posthoc import ...
    assert "gevit_lib.nn.fast_attention" in graph["gevit_lib.nn.attention"]  # from .fast_attention import ...


def test_gevit_lib_has_no_import_cycle() -> None:
    assert _cycles(_import_graph()) == []


def test_every_module_imports_only_its_own_layer_or_the_layers_above() -> None:
    def layer(module: str) -> int:
        top = module.split(".")[1]
        found = [i for i, names in enumerate(LAYERS) if top in names]
        assert found, f"{module} is in no layer of the picture: add it to LAYERS and to docs/architecture.md"
        return found[0]

    graph = _import_graph()
    upward = [f"{m} -> {t}" for m, targets in sorted(graph.items()) if m != "gevit_lib"
              for t in sorted(targets) if t != "gevit_lib" and layer(t) > layer(m)]  # gevit_lib: __version__ only
    assert not graph["gevit_lib"], "gevit_lib/__init__.py should import nothing of the library"
    assert upward == []
