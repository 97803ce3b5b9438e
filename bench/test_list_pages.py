"""A tiny end-to-end run of the list-page benchmark against a real ``portunus-server
serve``: the seeding, the walks (complete, total agrees) and the report.

    PYTHONPATH=$PWD .venv/bin/python -m pytest bench/test_list_pages.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import list_pages  # noqa: E402


@pytest.mark.timeout(180)
def test_small_run_reports_every_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pages.json"
    args = ["--rules", "450", "--users", "120", "--clients", "4", "--calls", "3"]
    assert list_pages.main([*args, "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert (got["rules"], got["users"]) == (450, 120)
    assert len(got["series"]) == 20 and all(s["n"] == 3 for s in got["series"])
    assert "target page p99" in capsys.readouterr().out
