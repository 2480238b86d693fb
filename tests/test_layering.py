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


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in its file (inside functions too)."""
    paths = [path for package in sorted(OURS) for path in _files(package)]
    modules = {_module_name(path): path for path in paths}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {other for other in found if other in modules and other != name}
    return graph


def test_the_import_graph_of_the_tree_has_no_circle():
    graph = _import_graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", " -> ".join([*path[path.index(other) :], other])
            if other not in state:
                visit(other, [*path, other])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_inside_the_command_the_error_module_is_the_floor_and_the_entry_point_the_top():
    graph = _import_graph()
    assert not {name for name in graph["smarter.errors"] if name.startswith("smarter")}
    assert not [name for name, imports in graph.items() if "smarter.cli" in imports]
