"""The metrics catalog (portunus/metrics/catalog.py) is the one place a metric is
named: the code builds and reads series from it, docs/reference/metrics.md is
generated from it, and it is a leaf every process (the edge client too) can import."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from portunus.metrics.catalog import BY_FAMILY, BY_NAME, CATALOG, DETAIL_PREFIX, PREFIX

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "portunus"
CATALOG_FILE = PACKAGE / "metrics" / "catalog.py"
NAME = re.compile(r"^portunus_[a-z][a-z0-9_]*[a-z0-9]$")


def _metricsdoc() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "metricsdoc", REPO / "packaging/scripts/metricsdoc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["metricsdoc"] = module
    spec.loader.exec_module(module)
    return module


def test_the_reference_tables_are_the_catalog() -> None:
    doc = _metricsdoc()
    committed = doc.DOC.read_text()
    assert committed == doc.render(committed), (
        "docs/reference/metrics.md is stale: run `make reference` and commit it"
    )
    for m in CATALOG:
        assert f"| `{m.name}` | {m.kind} |" in committed, m.name


def test_every_entry_is_well_formed() -> None:
    assert len(BY_NAME) == len(CATALOG) and len(BY_FAMILY) == len(CATALOG)
    for m in CATALOG:
        assert NAME.match(m.name) and m.name.startswith(PREFIX), m.name
        assert m.kind in ("counter", "gauge"), m.name
        # A counter is exposed as <family>_total; nothing else may end like one.
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert m.help and not m.help[0].islower() and not m.help.endswith("."), m.name
        assert all(re.match(r"^[a-z_]+$", label) for label in m.labels), m.name
        assert len(set(m.labels)) == len(m.labels), m.name
        assert m.mode == "" or m.kind == "gauge", m.name
        assert m.exported == (not m.name.startswith(DETAIL_PREFIX))


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals that are not docstrings (docs may name a metric)."""
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_no_metric_name_is_spelled_outside_the_catalog() -> None:
    names = {m.name for m in CATALOG} | {m.family_name for m in CATALOG}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == CATALOG_FILE:
            continue
        for line, text in _string_constants(ast.parse(path.read_text())):
            words = set(re.findall(r"portunus_[a-z0-9_]+", text))
            if words & names or DETAIL_PREFIX in text:
                found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert found == [], "use portunus.metrics.catalog instead:\n" + "\n".join(found)


def _portunus_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("portunus"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("portunus")}
    return out


def test_the_metrics_package_is_a_leaf() -> None:
    """Every process imports it (the edge client reads its counters through
    per_rule.py); it imports none of them, only the ``text`` leaf."""
    for path in (PACKAGE / "metrics").glob("*.py"):
        assert _portunus_imports(path) <= {"portunus.metrics", "portunus.text"}, path
