"""The floors: the base module imports nothing of ours, the model side only the base, data and callbacks
only the base and the model side's public names, and nothing below the command imports the command."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO_ROOT

OURS = {"foundation", "lightning_modules", "datamodules", "callbacks", "smarter"}
# package -> the packages of ours it may import ("lightning_modules" means its top-level public names only)
ALLOWED = {
    "foundation": set(),
    "lightning_modules": {"foundation", "lightning_modules.*"},
    "datamodules": {"foundation", "lightning_modules", "datamodules.*"},
    "callbacks": {"foundation", "lightning_modules", "callbacks.*"},
}


def _imports(path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [name for name in names if name.split(".")[0] in OURS]


def _files(package: str):
    return [REPO_ROOT / "foundation.py"] if package == "foundation" else sorted((REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_floors_never_import_higher_ones(package):
    allowed = ALLOWED[package]
    for path in _files(package):
        for name in _imports(path):
            top = name.split(".")[0]
            ok = name in allowed or (f"{top}.*" in allowed and name.startswith(f"{top}"))
            assert ok, f"{path.relative_to(REPO_ROOT)} imports {name}, above or beside its floor"
