"""Running the CLI as user nobody from a checkout nobody may be able to reach.

A checkout in a directory only root may enter (``mktemp -d``: 0700, as CI makes it)
holds both .venv/bin/python and the code, so user nobody can exec neither; the
``nobody_runtime`` fixture then runs the base interpreter on a world-readable copy of
the package and its runtime dependencies (tests that need another user: the token
and storage-access refusals)."""

from __future__ import annotations

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

import pytest

REPO = Path(__file__).resolve().parents[3]
NOBODY = 65534


@dataclass(frozen=True)
class Runtime:
    """An interpreter and a PYTHONPATH that user nobody can reach."""

    python: str
    path: str


def run_as(
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
        res = run_as(runtime, NOBODY, [NOBODY], "--version")
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


def nobody_runtime() -> Iterator[Runtime]:
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
