"""Exit codes of the long-running processes, in one place.

Two families, kept apart because they answer different questions:

- ``ServiceExit``: what ``portunus-server serve``, ``portunus-standalone`` and
  ``portunus-client`` (run mode) exit with.  Operators and systemd see these; they
  are documented in docs/operations.md and listed in the units'
  ``RestartPreventExitStatus=`` where a restart cannot help.
- ``ChildExit``: what a supervised child (shard, control, web, metrics, link)
  exits with.  Only the supervisor sees these; ``portunus.supervisor.policy`` maps
  (child role, child exit code) to "respawn" or "halt with a ServiceExit".

The CLI verbs' exit codes (0-10: usage, not found, forbidden, ...) stay in
``portunus.errors``, derived from error codes.
"""

from __future__ import annotations

from enum import IntEnum


class ServiceExit(IntEnum):
    """Exit code of a service process (the supervisor)."""

    OK = 0  # stopped on request (SIGTERM/SIGINT/SIGQUIT), everything drained
    ERROR = 1  # an unexpected internal error
    CONFIG_INVALID = 2  # check-config / standalone --check: the file is invalid
    REVOKED = (
        4  # portunus-client: the server revoked this client (the contract's "unauthenticated")
    )
    BOOT_FAILED = 70  # a child could not start (EX_SOFTWARE); its own log line says why
    LISTEN_FAILED = (
        73  # an own listener (API, metrics, edge gateway) could not be bound (EX_CANTCREAT)
    )
    CRASH_LOOP = 75  # a child died too often after a good start (EX_TEMPFAIL: try again later)
    CONFIG = (
        78  # invalid configuration at start, a database schema newer than this code, or a
        # secret file others may read (cli/secret_files.py) (EX_CONFIG)
    )


class ChildExit(IntEnum):
    """Exit code of a supervised child; the supervisor's policy table reads these."""

    OK = 0
    CRASHED = 1  # an exception escaped the child's entry point
    BOOT_ERROR = 3  # the child could not set itself up
    LOST_SUPERVISOR = 4  # a shard whose supervisor channel closed
    REVOKED = 77  # the edge link: the server revoked this client's token
    LISTEN_FAILED = 73  # an own listener could not be bound (when the child binds it itself)
    CONFIG = 78  # schema newer than this code, or a configuration the child refuses


# Documented in one table (README reference and docs/operations.md) from here.
SERVICE_EXIT_MEANING: dict[ServiceExit, str] = {
    ServiceExit.OK: "stopped on request; open connections drained",
    ServiceExit.ERROR: "unexpected internal error (see the supervisor.crashed log line)",
    ServiceExit.CONFIG_INVALID: "check-config / --check: the configuration file is invalid",
    ServiceExit.REVOKED: "portunus-client only: the server revoked this client; re-enroll",
    ServiceExit.BOOT_FAILED: "a child process could not start; the child's log line says why",
    ServiceExit.LISTEN_FAILED: "an own listener (API, metrics, edge gateway) could not be bound",
    ServiceExit.CRASH_LOOP: "a child died too often after a good start (crash loop)",
    ServiceExit.CONFIG: "invalid configuration, a database schema newer than this code, "
    "or a file holding secrets that other users may read",
}
