"""Fault injection for end-to-end tests, loaded only by processes whose
PYTHONPATH names this directory (``faults_env`` in support/faults/__init__.py).

``PORTUNUS_TEST_FAULT=shard_boot`` makes every shard fail while it sets itself up
(before it can say ``ready``), as a broken install or a missing kernel feature
would: the supervisor must treat that as fatal to start-up, not respawn it forever.
The product has no such switch; the patch is applied from outside, when
``portunus.shard.main`` is imported (in the forked shard).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

FAULT = os.environ.get("PORTUNUS_TEST_FAULT", "")
TARGET = "portunus.shard.main"


def _patch(module: object) -> None:
    def start(self: object) -> None:
        raise RuntimeError("injected shard boot fault (PORTUNUS_TEST_FAULT=shard_boot)")

    module.Shard.start = start  # type: ignore[attr-defined]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            real_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if FAULT == "shard_boot":
    sys.meta_path.insert(0, _Finder())
