"""The files that hold secrets must not be readable by other users.

``serve`` checks them before it starts anything: state.db (token and code hashes,
the audit trail), server.key (the edge gateway's TLS key), operator.token, and
server.toml when it carries ``operator_token``.  Portunus creates them 0600 (0640
group ``portunus`` for operator.token); a file that others can read was widened by
hand or restored from a backup without its mode, and starting would keep the secret
exposed, so ``serve`` refuses (exit 78) and names the ``chmod`` that fixes it.
"""

from __future__ import annotations

import os
import stat

from portunus.config import Settings
from portunus.exitcodes import ServiceExit

EXIT_INSECURE = ServiceExit.CONFIG  # EX_CONFIG, as for an invalid server.toml


def secret_paths(settings: Settings) -> list[str]:
    paths = [settings.db_path, os.path.join(settings.data_dir, "server.key"), settings.token_path]
    config_path = settings.config_path
    if config_path and settings.operator_token:
        paths.append(config_path)
    return paths


def insecure(paths: list[str]) -> list[str]:
    """One ``error: …`` line per existing file that others may read or write."""
    problems: list[str] = []
    for path in paths:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o007:
            problems.append(
                f"error: insecure permissions: {path} is accessible by other users (mode {mode:04o}); "
                f"it holds secrets: run `chmod o-rwx {path}` (Portunus creates it 0600)"
            )
    return problems
