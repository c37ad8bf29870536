"""The rooms of ARCHITECTURE.md, checked: no import cycle, and no import across rooms that
the architecture does not allow (the worker never imports the launcher, the host never
imports the launcher, nothing in app/ imports scripts/ or infra/).

Every import counts, at the top of a module or inside a function (a lazy import is still a
dependency); only those under `if TYPE_CHECKING:` do not, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.paths import ROOT

PACKAGES = ("app", "scripts", "infra")
ROOMS = ("worker", "launcher", "host", "store", "sinks")
ALLOWED = {
    "app.shared": {"app.shared", "app.store"},
    "app.store": {"app.shared", "app.store"},
    # Written by the workers, checked and finished by the launcher.
    "app.sinks": {"app.shared", "app.store", "app.sinks"},
    "app.worker": {"app.shared", "app.store", "app.sinks", "app.worker"},
    "app.launcher": {"app.shared", "app.store", "app.sinks", "app.launcher"},
    "app.host": {"app.shared", "app.store", "app.host"},
    # `celery -A app` finds the worker's Celery app through the package itself.
    "app.entry": {"app.shared", "app.worker"},
    # `from app import fleet`: the Python API, on top of the launcher.
    "app.api": {"app.shared", "app.store", "app.sinks", "app.launcher", "app.api"},
    "scripts": {
        "app.shared",
        "app.store",
        "app.sinks",
        "app.worker",
        "app.launcher",
        "app.host",
        "app.api",
        "scripts",
    },
    # The Pulumi program runs without the app's servers and clients.
    "infra": {"app.shared", "infra"},
}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "app":
        return parts[0]
    if module == "app":
        return "app.entry"
    if module == "app.fleet":
        return "app.api"
    if module in ("app.boot", "app.agent"):  # python -m entry points of the host daemons
        return "app.host"
    return f"app.{parts[1]}" if parts[1] in ROOMS else "app.shared"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(tree: ast.AST, known: set[str]) -> set[str]:
    """The project's modules `tree` imports (`from pkg import mod` counts as pkg.mod)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m.split(".")[0] in PACKAGES and m in known}


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(ast.parse(p.read_text()), known) for p in files}


# The one module allowed a crossing: the driver of a submitted job runs the launcher's
# dispatch loop in a worker's main process (imported at the first job it drives).
EXCEPTIONS = {"app.worker.drivers": {"app.launcher"}}


def forbidden(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if room(b) not in ALLOWED[room(a)] and room(b) not in EXCEPTIONS.get(a, ())
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per import cycle found (depth-first search over the graph)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


def test_the_graph_is_the_projects():
    graph = import_graph()
    assert len(graph) > 80
    assert "app.batch" in graph["app.worker.task"]
    assert "app.launcher.plan" in graph["scripts.simulate"]
    # Under TYPE_CHECKING only: the dispatch loop is given its launcher, never imports it.
    assert "app.launcher.launcher" not in graph["app.launcher.dispatch"]


def test_no_import_crosses_rooms_the_architecture_keeps_apart():
    assert forbidden(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_a_forbidden_import_and_a_cycle():
    graph = {
        "app.worker.task": {"app.launcher.launcher"},
        "app.launcher.launcher": {"app.store.base"},
        "app.host.agent": {"scripts.cli"},
        "app.settings": {"app.names"},
        "app.names": {"app.settings"},
    }
    assert forbidden(graph) == [
        "app.host.agent -> scripts.cli",
        "app.worker.task -> app.launcher.launcher",
    ]
    assert cycles(graph) == [["app.names", "app.settings", "app.names"]]
