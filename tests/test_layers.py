"""Import structure (issue 26, item 5): every package imports only itself and the layers below it, and no
module imports itself back through others. Imports inside functions count: a lazy import is still a circle.

Checked on the source (``ast``), so the test fails on the offending line before it could fail at run time.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hashattention"

#: bottom to top: a unit may import itself and what is before it. "hashattention" is the package's
#: ``__init__`` (the public API), ``__main__`` the ``python -m hashattention`` entry point.
LAYERS = ["core", "kernels", "weights", "policies", "integration", "models", "shipped", "hashattention",
          "engine", "evaluation", "training", "benchmarks", "cli", "__main__"]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PKG) -> dict[str, dict[str, int]]:
    """{module: {imported module of the package: line}} for every module under ``root``."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for mod, path in files.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            for t in targets:
                while t and t not in files and "." in t:  # ``import a.b.c`` -> the deepest module we have
                    t = t.rpartition(".")[0]
                if t in files and t != mod:
                    edges.setdefault(t, node.lineno)
        graph[mod] = edges
    return graph


def unit(mod: str) -> str:
    """The layer a module belongs to: its subpackage, its top-level module, or the package itself."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, dict[str, int]], layers=LAYERS) -> list[str]:
    bad = []
    for mod, edges in graph.items():
        for t, line in edges.items():
            a, b = unit(mod), unit(t)
            if a != b and layers.index(b) > layers.index(a):
                bad.append(f"{mod}:{line} imports {t} ({a} is below {b})")
    return bad


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as [m0, m1, ..., m0], or None."""
    color, stack = {}, []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for t in graph.get(m, {}):
            if color.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in color:
                found = visit(t)
                if found:
                    return found
        color[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in color:
            found = visit(m)
            if found:
                return found
    return None


def test_every_unit_has_a_layer():
    units = {unit(m) for m in import_graph()}
    assert units <= set(LAYERS), f"place {sorted(units - set(LAYERS))} in LAYERS"
    assert {"core", "kernels", "policies", "integration", "engine", "evaluation", "training", "cli"} <= units


def test_packages_import_only_downward():
    bad = upward_imports(import_graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """The three circles this replaced, as they were: each is caught."""
    old = {
        "hashattention.policies.base": {"hashattention.integration.hf": 82},
        "hashattention.integration.hf": {"hashattention.policies.base": 24},
        "hashattention.evaluation.perplexity": {"hashattention.evaluation.runner": 47},
        "hashattention.evaluation.runner": {"hashattention.evaluation.perplexity": 31},
        "hashattention.engine.memory": {"hashattention.engine.model": 106},
        "hashattention.engine.model": {"hashattention.engine.memory": 294},
    }
    assert upward_imports(old) == ["hashattention.policies.base:82 imports hashattention.integration.hf "
                                   "(policies is below integration)"]
    seen = []
    while (cycle := find_cycle(old)) is not None:
        seen.append(sorted(set(cycle)))
        del old[cycle[0]]
    assert len(seen) == 3


def test_graph_sees_lazy_imports():
    # make_policy imports weights inside the function: such imports are in the graph (the circles were lazy)
    assert "hashattention.weights" in import_graph()["hashattention.policies"]
