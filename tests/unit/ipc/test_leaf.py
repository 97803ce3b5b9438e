"""portunus/ipc is a leaf: every process imports it to speak across a boundary, so it
imports none of them (only the tiny shared leaves), and the processes take their
channel code from it rather than from each other."""

from __future__ import annotations

import ast
from pathlib import Path

PORTUNUS = Path(__file__).resolve().parents[3] / "portunus"
LEAVES = {"portunus.ipc", "portunus.safejson", "portunus.bounds", "portunus.errors"}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "portunus":
            out.update(f"portunus.{a.name}" for a in node.names)  # from portunus import x
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("portunus")}


def test_ipc_imports_only_leaves() -> None:
    for path in (PORTUNUS / "ipc").glob("*.py"):
        for module in _imports(path):
            assert any(module == leaf or module.startswith(leaf + ".") for leaf in LEAVES), (
                f"{path.name} imports {module}"
            )


def test_processes_take_channel_code_from_ipc_only() -> None:
    """The shard does not import the supervisor, and control does not import the edge
    client, to speak to them."""
    for package, foreign in (("shard", "portunus.supervisor"), ("control", "portunus.edge.")):
        for path in (PORTUNUS / package).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith(foreign)}
            assert not bad, f"{path.relative_to(PORTUNUS)} imports {bad}"
