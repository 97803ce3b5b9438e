"""The offline storage verbs as a user who is not state.db's owner: refused with a
message that says who may run them (root or the service user) and how, instead of
a bare SQLite error.  Needs root, to run the CLI as another user."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .nobody import NOBODY, Runtime, nobody_runtime, run_as

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run the CLI as another user"
)


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    yield from nobody_runtime()


request_cleanup: list[Path] = []


@pytest.fixture(autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    while request_cleanup:
        shutil.rmtree(request_cleanup.pop(), ignore_errors=True)


@pytest.mark.parametrize("verb", [["backup", "--out", "/tmp/x.db"], ["reset", "--confirm"]])
def test_non_owner_is_told_to_use_root_or_the_service_user(
    verb: list[str], runtime: Runtime
) -> None:
    # pytest's tmp_path sits under a 0700 directory another user cannot traverse.
    tmp_path = Path(tempfile.mkdtemp(prefix="ptn-access-", dir="/tmp"))
    request_cleanup.append(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o750)
    os.chown(data, 0, NOBODY)  # like /var/lib/portunus for a member of group portunus
    db = data / "state.db"
    sqlite3.connect(db).close()
    os.chmod(db, 0o600)
    res = run_as(
        runtime,
        NOBODY,
        [NOBODY],
        "--data-dir",
        str(data),
        *verb,
        extra_env={"PORTUNUS_RUNTIME_DIR": str(tmp_path / "run")},
    )
    assert res.returncode == 9, (res.returncode, res.stderr)
    assert res.stderr.startswith("error: forbidden: cannot open"), res.stderr
    assert "runuser -u portunus -- portunus-server" in res.stderr
