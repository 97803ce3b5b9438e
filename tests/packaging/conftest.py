"""Fixtures for the packaging tests (``make test-packages``; marker ``packaging``).

- ``packages``: the .deb and .rpm of the current tree, built with
  ``make -C packaging deb rpm`` (incremental), or taken from
  ``$PORTUNUS_TEST_DIST`` when set (to test artifacts built elsewhere).
- ``debian_root``: the cached debootstrap'd Debian 12 root (built on first use).
- ``boot``: factory ``boot(name) -> Machine``, a booted ephemeral container with
  the packages at /mnt/pkgs and probe.py at /mnt/probe; shut down at teardown.

Everything here needs root and the tools in machine.HOST_TOOLS; without them the
tests skip with the reason (``-ra`` shows it), never fail half-way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))  # so test modules can `from machine import ...`

from machine import HERE, REPO, Machine, Packages, ensure_root, missing_tools  # noqa: E402


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("packaging tests need root (dpkg-deb ownership, systemd-nspawn)")


@pytest.fixture(scope="session")
def packages() -> Packages:
    _need_root()
    missing = [t for t in ("dpkg-deb", "rpmbuild", "objdump", "make") if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"missing build tools: {', '.join(missing)} (apt-get install dpkg-dev rpm binutils make)"
        )
    version = subprocess.run(
        ["make", "-s", "-C", str(REPO / "packaging"), "version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dist_env = os.environ.get("PORTUNUS_TEST_DIST")
    dist = Path(dist_env) if dist_env else REPO / "dist"
    if not dist_env:
        res = subprocess.run(
            ["make", "-C", str(REPO / "packaging"), "deb", "rpm", f"PIP={sys.executable} -m pip"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if res.returncode != 0:
            pytest.fail(
                f"make deb rpm failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
    pkgs = Packages(
        dist,
        version,
        dist / f"portunus_{version}_amd64.deb",
        dist / f"portunus-{version}-1.x86_64.rpm",
    )
    for p in (pkgs.deb, pkgs.rpm):
        assert p.is_file(), f"{p} was not built"
    return pkgs


@pytest.fixture(scope="session")
def debian_root() -> Path:
    _need_root()
    missing = missing_tools()
    if missing:
        pytest.skip(
            f"missing: {', '.join(missing)} (apt-get install debootstrap systemd-container)"
        )
    return ensure_root()


@pytest.fixture(scope="module")
def boot(
    debian_root: Path, packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Machine]]:
    machines: list[Machine] = []

    def start(name: str) -> Machine:
        log = tmp_path_factory.mktemp("nspawn") / f"{name}.console.log"
        m = Machine(debian_root, {str(packages.dist): "/mnt/pkgs", str(HERE): "/mnt/probe"}, log)
        machines.append(m)
        m.boot()
        return m

    yield start
    for m in machines:
        m.shutdown()
