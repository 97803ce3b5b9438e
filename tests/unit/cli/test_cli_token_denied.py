"""An operator who may not read the token: exit 4 with who may, never a usage error.

The packaged layout: /var/lib/portunus is 0750 portunus:portunus, so a user outside
the group can neither list the data dir nor read operator.token in it.  That is "no
token you may read" (exit 4), not click's "--data-dir is not readable" (exit 2).
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from portunus.cli import common

REPO = Path(__file__).resolve().parents[3]
NOBODY = 65534


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


@dataclass(frozen=True)
class Runtime:
    """An interpreter and a PYTHONPATH that user nobody can reach."""

    python: str
    path: str


def _as(
    runtime: Runtime,
    uid: int,
    gids: list[int],
    *args: str,
    timeout: float = 60,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTUNUS_")}
    env["PYTHONPATH"] = runtime.path
    env.update(extra_env or {})
    return subprocess.run(
        [runtime.python, "-m", "portunus.cli.server", *args],
        env=env,
        cwd="/",
        user=uid,
        group=gids[0],
        extra_groups=gids[1:],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _probe(runtime: Runtime) -> str | None:
    """None when user nobody can run the CLI from ``runtime``, else why not."""
    try:
        res = _as(runtime, NOBODY, [NOBODY], "--version")
    except OSError as e:  # exec failed in the child: the interpreter is not reachable
        return f"{runtime.python}: {e}"
    return None if res.returncode == 0 else res.stderr[-300:]


def _runtime_distributions() -> list[metadata.Distribution]:
    """Portunus's installed runtime dependencies, transitively (no extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [r for r in metadata.requires("portunus") or [] if "extra ==" not in r]
    while todo:
        name = re.split(r"[\s;<>=!~\[(]", todo.pop(), maxsplit=1)[0]
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an environment marker excluded it
        seen[key] = dist
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return list(seen.values())


def _reachable_copy(top: str) -> Runtime:
    """Copy the portunus package and its runtime dependencies to ``top`` (mode 0755).

    A checkout in a directory only root may enter (``mktemp -d``: 0700) holds both
    .venv/bin/python and the code; user nobody can exec neither.  The base interpreter
    (/usr/bin/python3.11) plus this copy on PYTHONPATH runs the same code.
    """
    os.chmod(top, 0o755)
    lib = os.path.join(top, "lib")
    shutil.copytree(
        REPO / "portunus",
        os.path.join(lib, "portunus"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for dist in _runtime_distributions():
        for f in dist.files or []:
            if f.parts[0] == ".." or "__pycache__" in f.parts:
                continue  # scripts in bin/, byte code
            dest = os.path.join(lib, *f.parts)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(f.locate(), dest)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    return Runtime(os.path.realpath(sys.executable), lib)


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    """The checkout as it is when nobody can reach it, else a reachable copy of it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as another user")
    here = Runtime(sys.executable, str(REPO))
    if _probe(here) is None:
        yield here
        return
    top = tempfile.mkdtemp(prefix="portunus-cli-copy-")
    try:
        copy = _reachable_copy(top)
        why = _probe(copy)
        if why is not None:
            pytest.skip(
                f"user {NOBODY} cannot run this checkout ({_probe(here)}) nor a copy of it: {why}"
            )
        yield copy
    finally:
        shutil.rmtree(top, ignore_errors=True)


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
    res = _as(runtime, NOBODY, [NOBODY], "--data-dir", locked_data_dir, "list-rules")
    assert res.returncode == 4, res.stderr
    assert "not readable" not in res.stderr and "Usage:" not in res.stderr
    assert f"permission denied on {locked_data_dir}/operator.token" in res.stderr
    assert f"hint: run the CLI as root or as a member of group {group.gr_name} " in res.stderr


def test_member_reads_the_default_token(
    locked_data_dir: str, group: grp.struct_group, runtime: Runtime
) -> None:
    """A member gets past the token and only then finds no server (exit 1)."""
    res = _as(runtime, NOBODY, [NOBODY, group.gr_gid], "--data-dir", locked_data_dir, "list-rules")
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
    res = _as(
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
