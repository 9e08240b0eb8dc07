"""The package's structure holds: no import cycles (lazy imports inside functions count), at most
16 modules directly in ``edgeguard/``, and the layer contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(m for m in graph.modules if m.startswith("edgeguard."))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if not child.startswith("edgeguard.") or child not in modules:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        found.append(sorted(component))
    return found


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("edgeguard", "edgeguard_convert")
    assert _cycles(graph) == []


def test_a_planted_cycle_is_found():
    """The cycle finder itself: two modules importing each other form one component."""
    graph = grimp.ImportGraph()
    for m in ("edgeguard.a", "edgeguard.b", "edgeguard.c"):
        graph.add_module(m)
    graph.add_import(importer="edgeguard.a", imported="edgeguard.b")
    graph.add_import(importer="edgeguard.b", imported="edgeguard.a")
    graph.add_import(importer="edgeguard.b", imported="edgeguard.c")
    assert _cycles(graph) == [["edgeguard.a", "edgeguard.b"]]


def test_the_top_level_package_stays_small():
    modules = [p for p in (ROOT / "edgeguard").glob("*.py")]
    assert len(modules) <= 16, sorted(p.name for p in modules)


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (it is in the test extra)")
def test_layer_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
