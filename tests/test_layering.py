"""The house has one direction: the protocol imports neither wing, the coordinator imports only the
protocol of ``peer/``, the rest of ``peer/`` never imports the coordinator, and no module imports one
that imports it back. Read from the source with ``ast`` (every import counts: a nested one, one under
``TYPE_CHECKING``), so a shortcut taken anywhere fails here before it ties the wings together."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("peer", "coordinator")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
}


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every project module ``name`` imports, with the line; ``from a import b`` is ``a.b`` when that is
    a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield target, node.lineno


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _wing(module: str) -> str:
    if module == "peer.protocol" or module.startswith("peer.protocol."):
        return "protocol"
    if module == "peer":  # the package itself: its __init__ is a docstring
        return "peer"
    return module.split(".")[0]


ALLOWED = {"protocol": {"protocol"}, "coordinator": {"coordinator", "protocol"}, "peer": {"peer", "protocol"}}


def test_the_graph_was_read() -> None:
    """Guards the other tests against passing on an empty graph."""
    assert {"peer.protocol.envelope", "peer.trainer", "coordinator.app"} <= set(MODULES)
    assert "peer.protocol.envelope" in {target for target, _ in GRAPH["coordinator.app"]}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_its_own_wing_and_the_protocol(module: str) -> None:
    wing = _wing(module)
    crossing = [
        f"{target} (line {line})" for target, line in GRAPH[module] if _wing(target) not in ALLOWED[wing]
    ]
    assert not crossing, f"{module} ({wing}) imports {', '.join(crossing)}"


def test_no_module_imports_one_that_imports_it_back() -> None:
    """Depth-first search for a cycle; the first one found is named in full."""
    edges = {m: {t for t, _ in targets if t in MODULES and t != m} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_protocol_and_the_service_load_without_torch_or_hivemind() -> None:
    """A third-party client needs none of the training stack, and the coordinator runs without it."""
    protocol = [m for m in MODULES if _wing(m) == "protocol"]
    service = [m for m in MODULES if _wing(m) == "coordinator"]
    code = (
        "import importlib, sys\n"
        f"for name in {protocol + service!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'hivemind', 'peer.trainer') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
