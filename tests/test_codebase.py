"""The code's shape: no first-party import cycle (lazy imports included) and no function over 60 lines
outside bench/ and tests/, and one module that joins run-directory paths."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("textcam", "tasks", "flows", "reports")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """First-party modules ``name`` imports anywhere in its body (a package import counts as its
    ``__init__``)."""
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of ideas: drop parent -> child.
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_function_longer_than_60_lines() -> None:
    long = [
        f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60
    ]
    assert not long, long


def test_run_directory_paths_are_joined_in_one_module() -> None:
    """``run_dir / "..."`` (or ``run / ...``) appears in tasks/rundir.py only."""
    pattern = re.compile(r"\b(run_dir|run|rundir)\s*/\s*(\"|f\"|[A-Z_]+\b)")
    found = [
        f"{path.relative_to(ROOT)}:{i}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "rundir.py"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert not found, found


def test_the_analytics_do_not_import_torch() -> None:
    """The DuckDB build and the report run in processes of their own at scale; torch alone is ~0.5 GB of
    resident memory there (bench/scale.py measured 0.24 -> 0.72 GB when a constant pulled it in)."""
    import subprocess
    import sys

    code = "import sys, tasks.store, reports.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
