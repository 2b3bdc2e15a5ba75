"""Fail on any import cycle between the modules of a package (by default posttrain/).

    python scripts/check_imports.py            # exit 1 naming each cycle, e.g. a -> b -> a

Every import statement counts, at any depth (a function-level import that only dodges a cycle
is still a cycle), except those under `if TYPE_CHECKING:`, which never run. Imports of modules
outside the package (torch, ray, vllm, ...) are not edges. A package's `__init__.py` is the
package itself; `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`.
Importing a submodule also runs its packages' `__init__`, so `posttrain.x` importing
`posttrain.world.task` is an edge to `posttrain.world` too; a module's own packages are not
edges (their `__init__` is already running when it is imported). A module looked up by name
at run time (`importlib.import_module`, as the stage registry finds a stage) is not an edge:
the registry names stages, it does not depend on them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py file under the package."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Every Import/ImportFrom under `node`, skipping the bodies of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports_of(other)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _imports(node)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a module or a name inside one) belongs to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _parents(name: str) -> list[str]:
    """The packages whose `__init__` runs before `name` does: posttrain.a.b -> posttrain.a, posttrain."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")
                    base = base[:len(base) - node.level + (1 if is_package else 0)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None:
                    graph[name] |= {owner, *_parents(owner)} - {name, *_parents(name)}
    return graph


def import_cycles(package_dir: Path) -> list[str]:
    """One line per knot of modules that import each other: its shortest cycle from its first
    module, and every other module caught in it (an empty list: the imports form layers)."""
    graph = import_graph(package_dir)
    lines = []
    for component in knots(graph):
        cycle = _cycle_through(component, graph)
        others = sorted(set(component) - set(cycle))
        lines.append(" -> ".join(cycle) + (f" (also in the knot: {', '.join(others)})" if others else ""))
    return lines


def knots(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path from the component's first module back to itself (breadth-first)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path leads back to it")


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else ROOT / "posttrain"
    cycles = import_cycles(package_dir)
    for cycle in cycles:
        print("import cycle: " + cycle)
    if not cycles:
        print(f"no import cycles in {package_dir}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
