"""Durable, atomic file replacement for the few files Portunus writes itself
(server key and certificate, the edge client's bundle and rule store, the control
process's rule counter totals).  A leaf: server and edge code both use it, and it
imports neither.

A reader must see the old file or the new one, never a torn one; a secret must
never exist, even briefly, with a wider mode than asked; and after a power cut
the rename must not be undone, so the directory is fsynced too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def replace_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``, ending with ``mode`` (not umask-filtered)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=directory)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # after the data: a secret is never readable by others on the way
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def write_private_json(path: str, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON, mode 0600 from creation."""
    replace_file(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: not every fs allows it)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
