"""The layering of hibari's packages (README "Architecture"), enforced on the source.

    hibari <- parallel <- megatron_ext <- {checkpoints, data_pipeline} <- launch

A package may import the packages below it (directly or across layers: `launch` may import `hibari`), never one
above it or beside it: `checkpoints` and `data_pipeline` never import each other, nothing imports `launch`, and
`hibari` imports no project package. Every import counts: module-level and lazy (inside functions), absolute and
relative, and `importlib.import_module("...")` with a literal name. Also: no library module over 450 lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [("hibari",), ("parallel",), ("megatron_ext",), ("checkpoints", "data_pipeline"), ("launch",)]
PACKAGES = [p for layer in LAYERS for p in layer]
LEVEL = {p: i for i, layer in enumerate(LAYERS) for p in layer}
# a package may import exactly the packages of the layers below its own
ALLOWED = {(a, b) for a in PACKAGES for b in PACKAGES if LEVEL[b] < LEVEL[a]}
MAX_LINES = 450
EXEMPT_FROM_SIZE = ("launch/demo_data/bank_*.py",)  # the demo's sentence banks: data, not code


def library_files() -> list[Path]:
    files = []
    for package in PACKAGES:
        files += sorted((REPO / package).rglob("*.py"))
    return files


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__)."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module, is_package = _module_name(path, root)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return found


def package_graph() -> dict[tuple[str, str], list[str]]:
    """{(importing package, imported package): ["file:line", ...]} over project packages, self-edges excluded."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in library_files():
        src = path.relative_to(REPO).parts[0]
        for name, line in imported_modules(path):
            dst = name.split(".")[0]
            if dst in LEVEL and dst != src:
                edges[(src, dst)].append(f"{path.relative_to(REPO)}:{line}")
    return dict(edges)


def _cycle(nodes, edges) -> list[str] | None:
    """A cycle of the directed graph, or None (depth-first search with colours)."""
    succ = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in succ[n]:
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in nodes:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_relative_imports_resolve_and_walk_covers_lazy_imports(tmp_path):
    """The scanner itself: a relative import and an import inside a function are both seen."""
    pkg = tmp_path / "launch" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "launch" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from ..cli import main\n")
    (pkg / "m.py").write_text("def f():\n    from . import n\n    import checkpoints.cli\n"
                              "    importlib.import_module('hibari.io')\n")
    assert imported_modules(pkg / "__init__.py", tmp_path) == [("launch.cli", 1)]
    assert sorted(imported_modules(pkg / "m.py", tmp_path)) == [("checkpoints.cli", 3), ("hibari.io", 4),
                                                                 ("launch.sub", 2)]


def test_package_imports_follow_the_layers():
    graph = package_graph()
    wrong = {edge: where for edge, where in graph.items() if edge not in ALLOWED}
    lines = [f"{a} imports {b} (layer {LEVEL[a]} -> {LEVEL[b]}): {', '.join(where[:3])}"
             + (f" and {len(where) - 3} more" if len(where) > 3 else "") for (a, b), where in sorted(wrong.items())]
    assert not wrong, "imports against the layering:\n" + "\n".join(lines)
    # the layers are really used: each one is built on the one below
    for edge in [("parallel", "hibari"), ("megatron_ext", "parallel"), ("checkpoints", "megatron_ext"),
                 ("data_pipeline", "hibari"), ("launch", "megatron_ext")]:
        assert edge in graph, f"expected {edge[0]} to import {edge[1]}"


def test_package_graph_has_no_cycle():
    graph = package_graph()
    cycle = _cycle(PACKAGES, graph)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_hibari_imports_no_project_package_and_nothing_imports_launch():
    graph = package_graph()
    assert not [edge for edge in graph if edge[0] == "hibari"]
    assert not [edge for edge in graph if edge[1] == "launch"]
    assert ("checkpoints", "data_pipeline") not in graph and ("data_pipeline", "checkpoints") not in graph


def test_no_library_module_over_450_lines():
    exempt = {p for pattern in EXEMPT_FROM_SIZE for p in REPO.glob(pattern)}
    long = sorted((n, str(p.relative_to(REPO))) for p in library_files() if p not in exempt
                  for n in [len(p.read_text(encoding="utf-8").splitlines())] if n > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split by responsibility): " + ", ".join(
        f"{name} ({n})" for n, name in long)
