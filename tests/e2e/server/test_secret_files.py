"""Secrets at rest and in logs: ``serve`` refuses to start when a file holding
secrets is accessible by other users (exit 78, the chmod named), and the log scan
every e2e test ends with (tests/e2e/support/secrets.py) really finds a leak."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.e2e.support import SecretWatch


@pytest.mark.parametrize("name", ["operator.token", "state.db", "server.key"])
def test_secret_file_readable_by_others_refuses_to_start(server, name: str) -> None:  # type: ignore[no-untyped-def]
    srv = server()
    srv.stop(timeout=30)
    for secret in ("operator.token", "state.db", "server.key"):
        mode = stat.S_IMODE(os.stat(srv.data_dir / secret).st_mode)
        assert mode & 0o077 in (0, 0o040), f"{secret} created with mode {mode:04o}"
    path = srv.data_dir / name
    os.chmod(path, 0o644)
    mark = srv.log_mark()
    srv.start()
    assert srv.wait_exit(20) == 78
    err = srv.stderr_text()
    assert f"error: insecure permissions: {path} is accessible by other users (mode 0644)" in err, (
        err
    )
    assert f"chmod o-rwx {path}" in err
    assert not srv.events("supervisor.ready", since=mark), "it started anyway"
    os.chmod(path, 0o600)
    srv.start()
    srv.wait_ready()


def test_operator_token_in_a_readable_server_toml_refuses_to_start(server) -> None:  # type: ignore[no-untyped-def]
    srv = server(settings={"operator_token": "t" * 40}, start=False)
    os.chmod(srv.config_path, 0o644)
    srv.start()
    assert srv.wait_exit(20) == 78
    assert f"{srv.config_path} is accessible by other users" in srv.stderr_text()
    os.chmod(srv.config_path, 0o600)
    srv.start()
    srv.wait_ready()


def test_the_log_scan_finds_a_leaked_secret(tmp_path: Path) -> None:
    watch = SecretWatch()
    log = tmp_path / "x.stderr"
    log.write_text('{"event":"a"}\n')
    watch.watch(log)
    watch.harvest(
        "portunus-client enroll 'portunus://h:7443/enroll?code=AbCdEfGhIjKlMnOpQrStUv_-12&fp=sha256:00'"
    )
    watch.harvest('{"client_id": "c1", "token": "pcl_0123456789abcdefghij"}')
    watch.note("short")  # too short to scan for: it would match by accident
    assert watch.secrets == ["AbCdEfGhIjKlMnOpQrStUv_-12", "pcl_0123456789abcdefghij"]
    assert watch.scan() == []
    with log.open("a") as f:
        f.write('{"event":"b","token":"pcl_0123456789abcdefghij"}\n')
    [leak] = watch.scan()
    assert leak.startswith(f"{log}:2: contains a secret (pcl_")
    assert watch.scan() == []  # each byte is read once per secret
    watch.note("Zz" * 10)  # noted later: the whole file is checked for it
    with log.open("a") as f:
        f.write("nothing\n")
    assert watch.scan() == []
    log.write_text(log.read_text() + "ZzZzZzZzZzZzZzZzZzZz\n")
    assert len(watch.scan()) == 1
