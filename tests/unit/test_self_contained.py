"""The repository stands alone: no tracked file points at files outside it (a sibling
directory or a build machine's absolute path), so a fresh clone anywhere has all it
refers to."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Spelled in pieces so this file does not match itself.
OUTSIDE = re.compile("|".join([re.escape("../" + "shared/"), re.escape("/" + "work/")]))


def _tracked() -> list[Path]:
    try:
        res = subprocess.run(
            ["git", "-c", f"safe.directory={REPO}", "ls-files", "-z"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed)")
    return [REPO / name for name in res.stdout.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    hits = []
    for path in _tracked():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the work tree
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert hits == [], "\n".join(hits)
