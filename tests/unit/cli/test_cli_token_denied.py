"""An operator who may not read the token: exit 4 with who may, never a usage error.

The packaged layout: /var/lib/portunus is 0750 portunus:portunus, so a user outside
the group can neither list the data dir nor read operator.token in it.  That is "no
token you may read" (exit 4), not click's "--data-dir is not readable" (exit 2).
"""

from __future__ import annotations

import grp
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from portunus.cli import common

from .nobody import NOBODY, Runtime, nobody_runtime, run_as


def _other_group() -> grp.struct_group:
    """A named group user nobody is not in (plays the role of group portunus)."""
    for g in grp.getgrall():
        if g.gr_gid not in (0, NOBODY) and not g.gr_mem:
            return g
    pytest.skip("no spare group on this system")


def test_permission_denied_on_default_token_names_the_group(control, run, monkeypatch) -> None:
    path = os.path.join(control.data_dir, "operator.token")
    with open(path, "w") as f:
        f.write("secret\n")
    real_open = open

    def deny(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith("operator.token"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(common, "open", deny, raising=False)
    res = run("list-rules", env={"PORTUNUS_OPERATOR_TOKEN": None})
    assert res.exit_code == 4, res.stderr
    first, hint = res.stderr.splitlines()[:2]
    assert first.startswith("error: unauthenticated: no operator token this user") and path in first
    group = grp.getgrgid(os.stat(path).st_gid).gr_name  # the file is group-readable
    assert (
        hint.startswith("hint: ") and f"member of group {group}" in hint and "usermod -aG" in hint
    )
    assert control.requests == []


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    yield from nobody_runtime()


@pytest.fixture
def group() -> grp.struct_group:
    return _other_group()


@pytest.fixture
def locked_data_dir(group: grp.struct_group, runtime: Runtime) -> Iterator[str]:
    """A data dir like the package's: 0750 root:GROUP, token 0640 root:GROUP inside."""
    top = tempfile.mkdtemp(prefix="portunus-denied-")
    os.chmod(top, 0o755)
    data = os.path.join(top, "data")
    os.mkdir(data, 0o750)
    os.chown(data, 0, group.gr_gid)
    token = os.path.join(data, "operator.token")
    with open(token, "w") as f:
        f.write("secret\n")
    os.chown(token, 0, group.gr_gid)
    os.chmod(token, 0o640)
    try:
        yield data
    finally:
        subprocess.run(["rm", "-rf", top], check=False)


def test_outsider_gets_exit_4_not_a_usage_error(
    locked_data_dir: str, group: grp.struct_group, runtime: Runtime
) -> None:
    res = run_as(runtime, NOBODY, [NOBODY], "--data-dir", locked_data_dir, "list-rules")
    assert res.returncode == 4, res.stderr
    assert "not readable" not in res.stderr and "Usage:" not in res.stderr
    assert f"permission denied on {locked_data_dir}/operator.token" in res.stderr
    assert f"hint: run the CLI as root or as a member of group {group.gr_name} " in res.stderr


def test_member_reads_the_default_token(
    locked_data_dir: str, group: grp.struct_group, runtime: Runtime
) -> None:
    """A member gets past the token and only then finds no server (exit 1)."""
    res = run_as(
        runtime, NOBODY, [NOBODY, group.gr_gid], "--data-dir", locked_data_dir, "list-rules"
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("error: unavailable: "), res.stderr


def test_outsider_with_a_token_may_not_open_the_socket(
    locked_data_dir: str, group: grp.struct_group, runtime: Runtime
) -> None:
    """Like /run/portunus (0750 portunus:portunus): not "is serve running?" but who may."""
    run_dir = os.path.join(os.path.dirname(locked_data_dir), "run")
    os.mkdir(run_dir, 0o750)
    os.chown(run_dir, 0, group.gr_gid)
    sock = os.path.join(run_dir, "control.sock")
    res = run_as(
        runtime,
        NOBODY,
        [NOBODY],
        "--data-dir",
        locked_data_dir,
        "--socket",
        sock,
        "list-rules",
        extra_env={"PORTUNUS_OPERATOR_TOKEN": "some-token"},
    )
    assert res.returncode == 1, res.stderr
    first, hint = res.stderr.splitlines()[:2]
    assert first.startswith(
        f"error: unavailable: this user may not open the control socket {sock}"
    ), first
    assert (
        hint == f"hint: run the CLI as root or as a member of group {group.gr_name} "
        f"(`usermod -aG {group.gr_name} nobody`)"
    ), hint
