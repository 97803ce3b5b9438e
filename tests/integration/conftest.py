"""Integration tests: one real product process (control, web) started by the test,
which plays its supervisor and peers.  Slower than unit tests (a process per
test), narrower than the end-to-end tests (no supervisor, no shards)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temp dir: AF_UNIX paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ptn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
