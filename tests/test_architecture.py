"""The packages' imports read top to bottom, and inside each package too.

Between packages: senet -> slurm -> training -> pipeline / models. senet (the command line) is on top
and nothing imports it; slurm wraps training; training never imports slurm or senet; pipeline knows
nothing of models and models nothing of data; neither imports anything above them.

Inside a package: the modules form no cycle, so every module has one place in a one-way order and a
change has one obvious room. An import placed inside a function still counts: it hides a cycle from
Python's import machinery, not from a reader.

Both are checked on every import statement of every module, function-level ones included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("senet", "slurm", "training", "pipeline", "models")
MAY_IMPORT = {
    "senet": {"senet", "slurm", "training", "pipeline", "models"},
    "slurm": {"slurm", "training", "pipeline", "models"},
    "training": {"training", "pipeline", "models"},
    "pipeline": {"pipeline"},
    "models": {"models"},
}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that the module at `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def module_name(path: Path, root: Path) -> str:
    """`pipeline/pack_reader.py` -> `pipeline.pack_reader`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the other modules of the same package it imports (anywhere in its body, functions included).

    `from pkg import mod` and `from pkg.mod import name` both count as importing `pkg.mod`; a module
    importing its own package's `__init__` counts as importing the package.
    """
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in paths}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in paths:
                edges.add(node.module)
                edges |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in paths}
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_lies_below_it(package: str) -> None:
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) - MAY_IMPORT[package])
             for path in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in wrong.items() if v}


def test_nothing_outside_the_command_line_imports_it() -> None:
    users = [str(p.relative_to(ROOT)) for package in PACKAGES if package != "senet"
             for p in (ROOT / package).rglob("*.py") if "senet" in imported_packages(p)]
    assert users == []
    assert not (ROOT / "training" / "__main__.py").exists()  # the command is `python -m senet`


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str) -> None:
    assert cycles(import_graph(ROOT, package)) == []


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    """A planted three-module cycle, one edge of it inside a function, one through `from pkg import mod`."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reader.py").write_text("from pkg.index import Index\n")
    (pkg / "index.py").write_text("from pkg import writer\n")
    (pkg / "writer.py").write_text("def write():\n    from pkg.reader import read  # hidden from import time\n")
    (pkg / "alone.py").write_text("import pkg.reader\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.index", "pkg.reader", "pkg.writer"]]
    (pkg / "writer.py").write_text("def write():\n    return 1\n")
    assert cycles(import_graph(tmp_path, "pkg")) == []
