"""The package's shape: no import cycles (imports inside functions included), a small API."""

from __future__ import annotations

import ast
from pathlib import Path

import tl_lenses

PACKAGE = Path(tl_lenses.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every tl_lenses module ``path`` imports, at any depth, outside ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def _with_parents(name: str, known: set[str]) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & known


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in _imports(path, known):
            targets |= _with_parents(target, known)
        own_parents = _with_parents(name, known) - {name}
        graph[name] = targets - {name} - own_parents
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS, white/grey/black)."""
    state = dict.fromkeys(graph, 0)
    for root in sorted(graph):
        if state[root]:
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state[child] == 1:
                return path[path.index(child):] + [child]
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {find_cycle(import_graph())}"


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_views_import_no_method():
    graph = import_graph()
    viz = {name: deps for name, deps in graph.items() if name.startswith("tl_lenses.viz")}
    assert viz, "no viz modules found"
    for name, deps in viz.items():
        assert all(dep.startswith("tl_lenses.viz") for dep in deps), (name, deps)


def test_small_public_api():
    assert len(tl_lenses.__all__) <= 25
    assert all(hasattr(tl_lenses, name) for name in tl_lenses.__all__)
    for package in (tl_lenses.tuned, tl_lenses.attribute, tl_lenses.patchscopes,
                    tl_lenses.attribution, tl_lenses.readout):
        assert all(hasattr(package, name) for name in package.__all__), package.__name__
