"""The packages' imports read top to bottom: senet -> slurm -> training -> pipeline / models.

senet (the command line) is on top and nothing imports it; slurm wraps training; training never
imports slurm or senet; pipeline knows nothing of models and models nothing of data; neither imports
anything above them. Checked on every import statement, function-level ones included.
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
