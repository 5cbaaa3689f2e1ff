"""The project's import graph, built from the source (AST, no imports run): no circles, and the
core never depends on the areas built on it.

Every import statement counts, inside functions too: an import deferred into a function is still
a dependency, and a circle of them means neither module can be read or changed on its own.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> import name, as pyproject's [tool.setuptools] package-dir maps them.
PACKAGE_DIRS = {"dmf": "dmf", "train": "dmf.train", "export": "dmf.export", "runtime": "dmf.runtime",
                "bench": "dmf.bench"}
CORE_DIR = "dmf"
AREAS = ("dmf.train", "dmf.export", "dmf.runtime", "dmf.bench")  # built on the core, never imported by it


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line of the import statement


def module_files(root: Path, package_dirs: dict[str, str]) -> dict[str, Path]:
    """Import name -> source file, for every .py under each package folder."""
    modules = {}
    for folder, package in package_dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lives in (its longest known prefix), None for outside."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement may load: `from a import b` may load the module a.b."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the package the module is in (or is)
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" for a in node.names]


def _is_facade(source: str, target: str, path: Path) -> bool:
    """A package's __init__ importing its own submodules (re-exports, lazy `__getattr__`): Python
    always runs a package before any of its submodules, so the submodule -> package direction is
    there for every submodule anyway; this one direction is how a package presents its parts."""
    return path.name == "__init__.py" and target.startswith(source + ".")


def import_edges(root: Path = ROOT, package_dirs: dict[str, str] = PACKAGE_DIRS, *,
                 top_level_only: bool = False) -> list[Edge]:
    """Module -> module edges of the project (within it only). top_level_only: the imports that run
    when the module is imported (not those inside functions)."""
    modules = module_files(root, package_dirs)
    edges = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in _top_level(nodes) if top_level_only else nodes:
            for name in _imported(node, source, path.name == "__init__.py"):
                target = _known(name, modules)
                if target and target != source and not _is_facade(source, target, path):
                    edges.append(Edge(source, target, f"{path.relative_to(root)}:{node.lineno}"))
    return edges


def _top_level(body: list[ast.stmt]):
    """The statements run at import time: module level, inside if/try/with/class bodies, never
    inside a function."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _top_level(getattr(node, field, None) or [])


@dataclass(frozen=True)
class Circle:
    modules: frozenset[str]  # the strongly connected group: each reaches every other
    path: tuple[Edge, ...]  # one circle through it, edge by edge

    def __str__(self) -> str:
        """'a -> b (a.py:3) -> a (b.py:9)'."""
        return self.path[0].source + "".join(f" -> {e.target} ({e.where})" for e in self.path)


def cycles(edges: list[Edge]) -> list[Circle]:
    """One circle per strongly connected group of modules (Tarjan), as the edges that close it."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [Circle(frozenset(group), _circle(graph, group)) for group in groups]


def _circle(graph: dict[str, dict[str, Edge]], group: set[str]) -> tuple[Edge, ...]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, edge in sorted(graph.get(v, {}).items()):
                if w == start:
                    return tuple(paths[v] + [edge])
                if w in group and w not in paths:
                    paths[w] = paths[v] + [edge]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start} in {sorted(group)}")


# ---------------------------------------------------------------------------------------- tests
def test_the_package_map_is_pyprojects():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = {name: folder for name, folder in setuptools["package-dir"].items() if "/" not in folder}
    assert {package: folder for folder, package in PACKAGE_DIRS.items()} == declared


def test_the_import_graph_has_no_circle():
    found = cycles(import_edges())
    assert not found, "import circle(s):\n" + "\n".join(map(str, found))


def test_the_core_never_imports_the_areas_built_on_it():
    """dmf/ (config, model, preprocessing, data, contract) is imported by training, export, the
    runtime and the bench; at import time it imports none of them (dmf.cli names their command
    modules as strings and loads them when it runs)."""
    core = module_files(ROOT, {CORE_DIR: "dmf"})
    wrong = [f"{e.source} -> {e.target} ({e.where})" for e in import_edges(top_level_only=True)
             if e.source in core and e.target.startswith(AREAS)]
    assert not wrong, "the core imports an area built on it:\n" + "\n".join(wrong)


def test_a_circle_is_found_and_named(tmp_path):
    """The checker itself: a circle through a function-level import, a relative import and a
    `from package import module`, reported edge by edge; a package re-exporting its parts is not one."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")  # facade: not an edge
    (pkg / "a.py").write_text("from p.sub import b\nA = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import C\n")
    (pkg / "c.py").write_text("import p.a\nimport numpy\nC = 2\n")
    (pkg / "d.py").write_text("from p import a\n")  # into the circle, not part of it
    found = cycles(import_edges(tmp_path, {"p": "p"}))
    assert [str(c) for c in found] == [
        "p.a -> p.sub.b (p/a.py:1) -> p.c (p/sub/b.py:2) -> p.a (p/c.py:1)"]
    top = {(e.source, e.target) for e in import_edges(tmp_path, {"p": "p"}, top_level_only=True)}
    assert ("p.sub.b", "p.c") not in top and ("p.c", "p.a") in top
