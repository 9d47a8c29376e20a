"""The package layers, read from the source with ``ast``: which module imports which, and no loops.

``devnet`` sits above ``p2pgpu`` (it launches nodes and drives their CLI), so
``p2pgpu`` must import nothing from it; its ``devnet`` command arrives
through the ``p2pgpu.commands`` entry point instead. Inside ``kernels``,
spec validation sits above ``ops/`` and the registry, so the package's
import graph has no cycle; nor has any other package's. Imports inside
functions count too: a lazy import is still an edge.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, modules: Collection[str] = ()) -> Iterator[tuple[int, str]]:
    """Every absolute module name ``path`` imports at run time, with its line.

    ``from a.b import c`` is ``a.b.c`` when that is one of ``modules``, else
    ``a.b``. Imports under ``if TYPE_CHECKING:`` are left out: they never run,
    and they are how a type may name a module above its own.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    type_only = {id(inner) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for stmt in node.body for inner in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield node.lineno, submodule if submodule in modules else base


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports at run time (imports inside functions included)."""
    modules = package_modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = {target for _, target in imported_names(path, modules) if target in modules}
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first repeated at the end), or None."""
    colour: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_passes_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_p2pgpu_imports_nothing_from_devnet() -> None:
    found = [f"{path.relative_to(ROOT)}:{line} imports {target}"
             for path in package_modules("p2pgpu").values()
             for line, target in imported_names(path)
             if target == "devnet" or target.startswith("devnet.")]
    assert found == []


def test_the_kernels_import_graph_has_no_cycle() -> None:
    graph = import_graph("kernels")
    assert "kernels.spec" in graph and "kernels.ops.matmul" in graph  # the walk saw the package
    assert find_cycle(graph) is None


@pytest.mark.parametrize("package", ["ledger", "p2pgpu", "devnet"])
def test_no_package_has_an_import_cycle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 3  # the walk saw the package
    assert find_cycle(graph) is None
