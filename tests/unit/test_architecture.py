"""The package's shape, read from its source: stages as folders, one direction of imports (those
inside functions included), no cycle, a light planning side, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import ROOT

PACKAGE = ROOT / "qarac_dist"
# The stages, bottom first; a module may import its own stage and the ones below it.
LAYERS = {"config": 0, "plan": 1, "track": 2, "train": 3, "submit": 4, "preflight": 5,
          "sweep": 6, "status": 6, "summary": 6}
# What these import at module level, followed through qarac_dist's own modules, holds none of HEAVY.
LIGHT = ("config", "plan", "submit", "sweep", "status", "summary")
HEAVY = {"torch", "deepspeed", "transformers", "mlflow", "datasets"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body} | {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try))
                                        for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:  # `from . import data` imports the module qarac_dist.x.data
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, id(node) in top))
    return found


def _edges(module_level_only: bool = False) -> dict[str, set[str]]:
    """Edges between qarac_dist's modules. Importing a module of another package runs that
    package's __init__ too; importing within one's own package does not add that edge (a package
    __init__ importing its own modules is no cycle)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, at_top in _imports(module):
            if module_level_only and not at_top:
                continue
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if not target.startswith("qarac_dist.") or target == module:
                continue
            graph[module].add(target)
            package = target.rpartition(".")[0]
            if package in MODULES and package != "qarac_dist" and not module.startswith(package + ".") \
                    and module != package:
                graph[module].add(package)
    return graph


def _stage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_the_stages_are_folders():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert {"config", "plan", "submit", "train", "track", "preflight"} <= stages
    assert set(_stage(m) for m in MODULES) - {""} <= set(LAYERS), "a module outside the known stages"


def test_no_import_cycle_lazy_imports_included():
    graph = _edges()
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_imports_go_one_way():
    wrong = [f"{m} -> {t}" for m, targets in _edges().items() for t in targets
             if _stage(m) and _stage(t) and LAYERS[_stage(t)] > LAYERS[_stage(m)]]
    assert wrong == [], "imports against the direction (see qarac_dist/__init__.py):\n" + "\n".join(sorted(wrong))


def test_the_planning_side_imports_nothing_heavy_at_module_level():
    graph = _edges(module_level_only=True)
    problems = []
    for module in MODULES:
        if _stage(module) not in LIGHT:
            continue
        seen, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for target, at_top in _imports(current):
                if at_top and target.split(".")[0] in HEAVY:
                    problems.append(f"{module} -> ... {current} imports {target}")
            todo.extend(graph[current])
    assert problems == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_450_lines(module):
    assert len(MODULES[module].read_text().splitlines()) <= MAX_LINES


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    """The graph builder itself: an import inside a function is an edge."""
    tree = ast.parse("def f():\n    from ..train import loop\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("qarac_dist.submit.executors", node) == "qarac_dist.train"
    assert "qarac_dist.train.run" in _edges()["qarac_dist.submit.executors"]  # TrialJob's import, in a function
