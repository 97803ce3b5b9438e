"""A tiny run of bench/tls_link_memory.py: every mode opens its links, the real TLS
client gets its answers, and a per-link figure comes back.

    PYTHONPATH=$PWD .venv/bin/python -m pytest bench/test_tls_link_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import tls_link_memory  # noqa: E402
from portunus.control.fleet.cert import generate  # noqa: E402


@pytest.mark.parametrize("mode", tls_link_memory.MODES)
def test_each_mode_holds_its_links(mode: str, tmp_path: Path) -> None:
    cert, key = str(tmp_path / "c.crt"), str(tmp_path / "c.key")
    generate(cert, key, ["localhost", "127.0.0.1"])
    out = tls_link_memory.measure(mode, 40, 10, cert, key)
    assert out["mode"] == mode and out["links"] == 40
    # A figure, not a target: 40 links move RSS by a few pages either way.
    assert isinstance(out["per_link_kib"], float) and isinstance(out["base_kib"], int)
