"""The package layout mirrors the pipeline: stage folders, no import cycles, no Prefect in the library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = {"data", "model", "training", "tracking", "serving", "cli"}
ROOT_MODULES = {"__init__.py", "config.py", "schemas.py", "device.py"}


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in (REPO / package).rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its body (top level, functions, TYPE_CHECKING)."""

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(filter(None, (resolve(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}") or resolve(base)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules("recsys") | _modules("flows")
    return {module: _imports(module, path, known) for module, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_import_cycles_anywhere():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_never_imports_flows_or_prefect():
    offenders = []
    for module, path in _modules("recsys").items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{module}: {n}" for n in names if n.split(".")[0] in {"flows", "prefect"}]
    assert offenders == []


def test_import_recsys_loads_no_prefect():
    code = ("import sys, recsys, recsys.cli, recsys.training.train, recsys.tracking.runs, "
            "recsys.serving.score; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('prefect', 'flows')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_every_module_is_in_a_stage_folder_or_a_root_module():
    misplaced = []
    for path in (REPO / "recsys").rglob("*.py"):
        parts = path.relative_to(REPO / "recsys").parts
        if len(parts) == 1 and parts[0] not in ROOT_MODULES:
            misplaced.append(str(path.relative_to(REPO)))
        elif len(parts) > 1 and parts[0] not in STAGES:
            misplaced.append(str(path.relative_to(REPO)))
    assert misplaced == []


def test_every_public_name_of_a_stage_package_resolves():
    import importlib

    for package in ("recsys.data", "recsys.model", "recsys.training", "recsys.tracking", "recsys.serving"):
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"
        assert sorted(dir(module)) == sorted(module.__all__)
