"""Browser fixtures for the Web UI end-to-end tests: Playwright for Python driving
the system's chromium (Debian's ``chromium`` package; ``.ci/browser`` installs it).
No browser is ever downloaded: without playwright or chromium the tests skip and
say why.

Screenshots go to ``$PORTUNUS_SCREENSHOTS`` when set (``make screenshots`` points
it at docs/screenshots), else to the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = (
    os.environ.get("PORTUNUS_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
DESKTOP = {"width": 1280, "height": 800}
MOBILE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright (pip, test extra) is not installed"
    )
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium, or run .ci/browser)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("PORTUNUS_SCREENSHOTS") or tmp_path / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target
