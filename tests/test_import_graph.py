"""The module-level import graph of moe_router and moe_router_backends has no cycle.

Every module under ``moe_router/`` and ``backends/`` (installed as ``moe_router_backends``) is
parsed with :mod:`ast`; an edge ``a -> b`` is an import of ``b`` that runs when ``a`` is imported
(module body, class bodies, ``try`` / ``with`` / ``if`` blocks, but not function bodies nor
``if TYPE_CHECKING:`` blocks). A cycle means a module can see a half-initialised neighbour,
depending on which of the two a user imports first.

Also: a backend's entry-point module (``backends/*/plugin.py``) imports only ``hookimpl`` from
``moe_router.hookspecs``, so loading plugins imports neither a framework nor the rest of the core.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the package it installs as
PACKAGES = {"moe_router": "moe_router", "backends": "moe_router_backends"}


def _module_files() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_time_nodes(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements executed when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(node.orelse)
        elif isinstance(node, ast.ClassDef):
            yield from _import_time_nodes(node.body)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            yield from _import_time_nodes(node.body)
            for handler in node.handlers:
                yield from _import_time_nodes(handler.body)
            yield from _import_time_nodes(node.orelse)
            yield from _import_time_nodes(node.finalbody)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
            yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(getattr(node, "orelse", []))


def _base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (resolving ``from .x`` / ``from ..``)."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    assert keep >= 1, f"{module}: relative import beyond the top-level package"
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def imports_of(module: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(imported module, names)`` for every import-time import of ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in _import_time_nodes(tree.body):
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
        else:
            found.append((_base(module, node), tuple(alias.name for alias in node.names)))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports at import time."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES:
        for target, names in imports_of(module):
            submodules = {f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES}
            # ``from package import submodule`` imports the submodule; the package itself only
            # counts when a name comes from its __init__ (importing ``a.b`` always runs ``a``
            # first: those implicit parent imports are left out of the graph)
            if target in MODULES and (not names or len(submodules) < len(names)):
                graph[module].add(target)
            graph[module].update(submodules)
            graph[module].discard(module)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one node
    (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (BFS)."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def test_the_scan_sees_every_package() -> None:
    assert {"moe_router", "moe_router.config", "moe_router.registry", "moe_router.registrar",
            "moe_router_backends", "moe_router_backends.torch.plugin"} <= set(MODULES)
    graph = import_graph()
    assert "moe_router.hookspecs" in graph["moe_router.registry"]


def test_cycle_finder_reports_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles (move an import into a function, under " \
        "TYPE_CHECKING, or into a leaf module):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_registrar_is_a_leaf() -> None:
    ours = [target for target, _ in imports_of("moe_router.registrar")
            if target.partition(".")[0] in PACKAGES.values()]
    assert ours == [], f"moe_router.registrar must import nothing of ours, imports {ours}"


def test_hookspecs_and_builtins_import_only_the_marker() -> None:
    hookspec_imports = [t for t, _ in imports_of("moe_router.hookspecs")
                        if t.partition(".")[0] in PACKAGES.values()]
    assert hookspec_imports == []
    assert [(t, n) for t, n in imports_of("moe_router._builtins")
            if t.partition(".")[0] in PACKAGES.values()] == [("moe_router.hookspecs",
                                                              ("hookimpl",))]


PLUGINS = sorted(name for name in MODULES
                 if name.startswith("moe_router_backends.") and name.endswith(".plugin"))


@pytest.mark.parametrize("plugin", PLUGINS)
def test_backend_plugin_imports_only_hookimpl(plugin: str) -> None:
    ours = [(target, names) for target, names in imports_of(plugin)
            if target.partition(".")[0] in PACKAGES.values()]
    assert ours == [("moe_router.hookspecs", ("hookimpl",))], (
        f"{MODULES[plugin].relative_to(ROOT)} must import only hookimpl from moe_router.hookspecs "
        f"(annotate the registrar with a TYPE_CHECKING import); it imports {ours}")


def test_every_framework_has_a_plugin() -> None:
    assert [p.split(".")[1] for p in PLUGINS] == ["jax", "tensorflow", "torch"]


def test_no_top_level_module_named_backends_is_installed(tmp_path) -> None:
    """The plugin folder backends/ installs as ``moe_router_backends``: run from elsewhere,
    ``backends`` must not resolve (it would collide with other projects' ``backends``)."""
    import subprocess
    import sys

    code = ("import importlib.util as u; print(u.find_spec('backends') is None, "
            "u.find_spec('moe_router_backends.torch') is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["True", "True"]
