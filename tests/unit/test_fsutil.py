"""portunus/fsutil.py: private JSON files written atomically with mode 0600, and the
leaf it is: the server's control process writes its files with it without
importing the edge client's code."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

from portunus.fsutil import write_private_json

ROOT = Path(__file__).resolve().parents[2] / "portunus"


def test_write_private_json_replaces_the_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "totals.json"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        write_private_json(str(path), {"b": 1, "a": [1, 2]})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["totals.json"], "no temporary file left"


def _module_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_fsutil_is_a_leaf_and_control_does_not_import_the_edge_client() -> None:
    assert [n for n in _module_level_imports(ROOT / "fsutil.py") if n.startswith("portunus")] == []
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "control").rglob("*.py"))
        for name in _module_level_imports(path)
        if name == "portunus.edge" or name.startswith("portunus.edge.")
    ]
    assert found == []
