"""The package's import graph has no cycles, counting imports inside functions as well as at module level.

The graph is read from each module's AST, so nothing is imported. An edge goes from a module to every adaptserve
module it imports: `import a.b`, `from a import b` (to `a.b` where that is a submodule, else to `a`) and relative
forms alike. The parent packages that importing `a.b` runs first are not edges: every submodule would otherwise
form a cycle with a package `__init__` that re-exports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "adaptserve"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module in the package."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that one import statement in `module` names."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: drop one trailing part per level beyond the module's own package
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return {t for t in targets if t in modules}


def imported_by_name(node: ast.Call, modules: set[str]) -> set[str]:
    """`import_module("adaptserve.x")`, also when handed to another call (`to_thread(import_module, "...")`):
    a literal module name next to `import_module` is an import all the same."""

    def named(expr: ast.expr) -> str:
        return expr.attr if isinstance(expr, ast.Attribute) else expr.id if isinstance(expr, ast.Name) else ""

    if "import_module" not in {named(e) for e in [node.func, *node.args]}:
        return set()
    return {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)} & modules


def import_graph() -> dict[str, set[str]]:
    files = module_names()
    modules = set(files)
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= imported(node, name, is_package, modules)
            elif isinstance(node, ast.Call):
                edges |= imported_by_name(node, modules)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None (depth-first search, three colours)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    assert "adaptserve.export.native" in graph["adaptserve.export.cache"]  # `from adaptserve.export import native`
    assert "adaptserve.serve.hf_engine" in graph["adaptserve.serve.pool"]  # imported inside methods only
    assert "adaptserve.serve.ui" in graph["adaptserve.serve.ui_mount"]  # importlib.import_module("adaptserve.serve.ui")
    tree = ast.parse("from . import engine\nfrom .. import models\nfrom .kvslots import KVSlots")
    modules = set(graph)
    found = set().union(*(imported(n, "adaptserve.serve.pool", False, modules) for n in tree.body))  # type: ignore[arg-type]
    assert found == {"adaptserve.serve.engine", "adaptserve.models", "adaptserve.serve.kvslots"}


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
