"""The house's layers, read from the source: no import cycle, no upward import.

Protocol and client at the bottom; the session that carries environment and shell state above
them; the front-ends (kernel, IPython magics) and the views (panel, rendering) on top; the
server beside them, sharing only protocol definitions (plus the archive extractor, which the
server's unpacker runs, and the size formatter of ``_units``). Imports inside functions count
as much as those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sandbox_kernel"

#: Layer of each module (dotted, relative to the package), by the longest matching prefix.
LAYERS: dict[str, int] = {
    "protocol": 0,
    "_errors": 0,
    "_units": 0,
    "_signals": 0,
    "_generations": 1,
    "_wire": 2,
    "archive": 2,
    "client": 3,
    "async_client": 3,
    "discovery": 3,
    "settings": 4,
    "session": 5,
    "checking": 5,
    "magics": 6,
    "views": 6,
    "kernel": 7,
    "ipython": 7,
    "install": 7,
    "lab": 8,
    "grading": 8,
    "cli": 9,
    "__init__": 9,
    "__main__": 9,
}
#: What the server may import from the rest of the package.
SERVER_MAY_IMPORT = ("protocol", "_signals", "_units", "archive", "discovery", "__init__")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in its body."""
    package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package_parts[: len(package_parts) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sandbox_kernel"):
            found.add((node.module or "").removeprefix("sandbox_kernel").lstrip("."))
    modules = _modules()
    return {module for module in found if module in modules and module != name}


def _layer(module: str) -> int:
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module}: no layer; add it to LAYERS in {__file__}")


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items()}


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        if not module.startswith("server") and module:
            _layer(module)


def test_nothing_imports_upward() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        if module and not module.startswith("server")
        for target in targets
        if not target.startswith("server") and target and _layer(target) > _layer(module)
    ]
    assert upward == []


def test_views_never_import_front_ends() -> None:
    graph = _graph()
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith("views")
        for target in targets
        if target.startswith(("magics", "kernel", "ipython", "client"))
    ]
    assert wrong == []


def test_the_server_shares_only_protocol_definitions() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if module.startswith("server")
        for target in targets
        if not target.startswith("server") and target not in SERVER_MAY_IMPORT
    ]
    assert wrong == []


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    # Importing a submodule imports its package first: a package's own __init__ importing a
    # submodule is not a cycle with the submodule importing a sibling.
    edges = {
        name: {t for t in targets if not name.startswith(t + ".") and not t.startswith(name + ".")}
        for name, targets in graph.items()
    }
    cycle = _find_cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


@pytest.mark.parametrize(
    "name", ['"host"', '"container"', '"containers"', "cached_specifications", ".usages()"]
)
def test_nothing_parses_server_json_outside_the_client(name: str) -> None:
    """Only the client layer (client, _wire, _generations) reads the server's answers."""
    allowed = ("client", "_wire", "_generations", "server")
    readers = [
        module
        for module, path in _modules().items()
        if not module.startswith(allowed) and name in path.read_text()
    ]
    assert readers == []
