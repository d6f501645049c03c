"""The package's shape, read from its source: stages as folders, imports that follow the
design's graph (those inside functions included), no cycle, a light planning side, small
modules, one owner of the sweep directory's paths, no dead code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

PACKAGE = ROOT / "qarac_dist"
# The design's graph (qarac_dist/__init__.py): what each stage may import besides itself. Not a
# total order: plan and track are side by side, train knows nothing of plan or submit.
ALLOWED = {
    "base": set(),
    "config": {"base"},
    "plan": {"config", "base"},
    "track": {"config", "base"},
    "train": {"track", "config", "base"},
    "submit": {"plan", "track", "config", "base"},
    "preflight": {"train", "submit", "plan", "track", "config", "base"},
    "sweep": {"preflight", "submit", "train", "plan", "track", "config", "base"},
    "status": {"submit", "track", "config", "base"},
    "ui": {"submit", "track", "config", "base"},
    "prefetch": {"preflight", "train", "plan", "config", "base"},
}
# The one import against the graph, and only inside a function: a job runs the training side.
IN_A_JOB = {("qarac_dist.submit.executors", "train"), ("qarac_dist.submit.step", "train")}
# What these import at module level, followed through qarac_dist's own modules, holds none of HEAVY.
LIGHT = ("base", "config", "plan", "submit", "sweep", "status", "prefetch", "ui")
HEAVY = {"torch", "deepspeed", "transformers", "mlflow", "datasets"}
MAX_LINES = 400
LIMITS = {"qarac_dist.sweep": 150, "qarac_dist.train.loop": 300}
# The sweep directory's paths, as spelled: only base/layout.py may hold these file names in a
# string, or join these folder names onto a path with `/`.
SWEEP_FILES = ("manifest.json", "sweep.json", "micro_batch.json", ".parent.lock", "submitit-batch-size", "asha.csv",
               "curves.png", "cancelled.json", "claims.json", ".claims.lock", "bad_nodes.json", ".lock_probe", "lock_check.json",
               "search.jsonl", "search_history.png")
SWEEP_FOLDERS = {"trials", "asha", "submitit", ".lock"}


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
    assert {"base", "config", "plan", "submit", "train", "track", "preflight"} <= stages
    assert set(_stage(m) for m in MODULES) - {""} <= set(ALLOWED), "a module outside the known stages"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
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
    return cycles


def test_the_cycle_finder_finds_a_known_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_lazy_imports_included():
    assert _cycles(_edges()) == [], "import cycles"


def _wrong_way(edges: dict[str, set[str]], lazy: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        for target in targets:
            src, dst = _stage(module), _stage(target)
            if not src or not dst or src == dst or dst in ALLOWED[src]:
                continue
            if (module, dst) in IN_A_JOB and target in lazy[module]:
                continue
            wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def test_imports_follow_the_designs_graph():
    edges, top = _edges(), _edges(module_level_only=True)
    lazy = {m: edges[m] - top[m] for m in edges}
    assert _wrong_way(edges, lazy) == [], "imports against the graph (see qarac_dist/__init__.py)"


def test_the_graph_check_refuses_what_the_design_never_meant():
    """train -> plan (the old place of the successive-halving rule), track -> plan, and
    submit -> train at module level are refused; submit -> train inside the job is allowed."""
    edges = {"qarac_dist.train.loop": {"qarac_dist.plan.asha"}, "qarac_dist.track.rungs": {"qarac_dist.plan.asha"},
             "qarac_dist.submit.executors": {"qarac_dist.train.run"}}
    assert _wrong_way(edges, {m: set() for m in edges}) == [
        "qarac_dist.submit.executors -> qarac_dist.train.run", "qarac_dist.track.rungs -> qarac_dist.plan.asha",
        "qarac_dist.train.loop -> qarac_dist.plan.asha"]
    assert _wrong_way({"qarac_dist.submit.executors": {"qarac_dist.train.run"}},
                      {"qarac_dist.submit.executors": {"qarac_dist.train.run"}}) == []


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
def test_modules_stay_small(module):
    assert len(MODULES[module].read_text().splitlines()) <= LIMITS.get(module, MAX_LINES)


def test_the_sweep_directory_is_spelled_in_one_module():
    """Every file name of the sweep directory, and every path joined with one of its folders'
    names, is in base/layout.py (docstrings aside)."""
    found = []
    for module, path in MODULES.items():
        if module == "qarac_dist.base.layout":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if any(name in node.value for name in SWEEP_FILES):
                    found.append(f"{module}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.JoinedStr):  # f"rung{k}.jsonl"
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                if "rung{}.jsonl" in text:
                    found.append(f"{module}:{node.lineno}: {text!r}")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                if any(isinstance(side, ast.Constant) and side.value in SWEEP_FOLDERS for side in (node.left, node.right)):
                    found.append(f"{module}:{node.lineno}: a path joined with a sweep folder's name")
    assert found == [], "\n".join(found)


def test_no_dead_code():
    proc = subprocess.run([sys.executable, "-m", "vulture", str(PACKAGE), "--min-confidence", "80"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_the_checker_sees_lazy_imports():
    """The graph builder itself: an import inside a function is an edge."""
    tree = ast.parse("def f():\n    from ..train import loop\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("qarac_dist.submit.executors", node) == "qarac_dist.train"
    assert "qarac_dist.train.run" in _edges()["qarac_dist.submit.executors"]  # TrialJob's import, in a function
