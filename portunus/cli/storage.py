"""``backup``, ``restore`` and ``reset``: the offline storage verbs.

The only verbs that touch state.db directly (every other verb goes through the
control process).  ``backup`` is safe next to a live server
(SQLite's online backup API).  ``restore`` and ``reset`` replace the file the
control process has open, and the server has no online restore, so both refuse
while it runs: the control socket answering ``health`` is the first sign, a lock
held on the database by another process (a server on another runtime dir, one
still starting) the second.  Neither deletes anything: the database they replace
is kept as ``state.db.bak-<time>``.
"""

from __future__ import annotations

import os
import pwd
import sqlite3
from datetime import UTC, datetime

import click

from portunus.cli.common import OperatorContext, echo_json, format_option, hint_vars
from portunus.control.rpc.caller import call_sync
from portunus.control.store import offline, replace
from portunus.errors import PortunusError

HEALTH_TIMEOUT = 2.0


def local_actor() -> str:
    """The audit actor of an offline verb: ``os:<user>`` (the OS account that ran
    it, so it cannot be mistaken for an API user of the same name)."""
    try:
        name = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        name = f"uid{os.geteuid()}"
    return f"os:{name}"


def server_answers(socket_path: str) -> bool:
    """True when something answers ``health`` on the control socket (no token
    needed).  Any reply — even an error — means a control process is there."""
    try:
        call_sync(socket_path, None, "health", {}, timeout=HEALTH_TIMEOUT)
    except PortunusError as exc:
        return exc.code != "unavailable"
    except (OSError, ValueError):  # path too long, a garbled reply: nobody we know
        return False
    return True


def refuse_if_running(obj: OperatorContext, verb: str) -> None:
    if server_answers(obj.socket_path):
        raise offline.server_running_error(verb, f"its control socket {obj.socket_path} answers")


def _io_error(exc: OSError) -> PortunusError:
    where = f" {exc.filename}" if exc.filename else ""
    return PortunusError("io_error", f"cannot use{where}: {exc.strerror or exc}")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MiB"


def require_db_access(db: str, verb: str) -> None:
    """state.db is 0600, owned by the service user (it holds token hashes), and
    these verbs write it (the audit row, the replaced file): membership in group
    portunus is not enough.  Say so, and how, instead of a bare sqlite error."""
    if os.path.exists(db) and not os.access(db, os.R_OK | os.W_OK):
        raise PortunusError(
            "forbidden",
            f"cannot open {db} for {verb}: it is readable and writable only by its owner "
            "(the portunus user). Run the offline storage verbs as root, or as the service "
            f"user: runuser -u portunus -- portunus-server {verb} ...",
        )
    directory = os.path.dirname(db) or "."
    if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
        raise PortunusError(
            "forbidden",
            f"cannot write in {directory} for {verb} (SQLite needs it for its journal). Run as root, "
            f"or as the service user: runuser -u portunus -- portunus-server {verb} ...",
        )


def _is_live_file(db: str, out: str) -> bool:
    """``--out`` naming state.db or its -wal/-shm would overwrite the live data."""
    for path in (db, db + "-wal", db + "-shm"):
        if out == path or (
            os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out)
        ):
            return True
    return False


@click.command("backup")
@click.option(
    "--out",
    "out",
    required=True,
    metavar="FILE",
    help="Where to write the copy (0600; replaced atomically). A directory gets "
    "portunus-<UTC time>.db inside it.",
)
@format_option
@click.pass_obj
def backup(obj: OperatorContext, out: str, fmt: str) -> None:
    """Copy state.db to FILE — consistent even while the server runs.

    Uses SQLite's online backup API, so the server keeps serving; works just as
    well with the server stopped. The backup is recorded in the audit trail.

    \b
    Example:
      portunus-server backup --out /root/portunus-$(date +%F).db
    """
    db = obj.db_path
    require_db_access(db, "backup")
    if os.path.isdir(out):
        out = os.path.join(out, f"portunus-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.db")
    out = os.path.abspath(out)
    hint_vars(data_dir=obj.data_dir)
    if _is_live_file(db, out):
        raise PortunusError(
            "validation.out", f"--out {out} is the live database itself", field="out"
        )
    try:
        offline.backup(db, out)
        size = os.path.getsize(out)
        version = offline.schema_version(out)
    except OSError as exc:
        raise _io_error(exc) from None
    except sqlite3.Error as exc:  # an unreadable state.db, a missing directory for --out
        raise PortunusError("io_error", f"cannot copy {db} to {out}: {exc}") from None
    audited = True
    try:
        offline.append_audit(
            db,
            local_actor(),
            "storage.backup",
            f"file:{out}",
            {"bytes": size, "schema_version": version},
        )
    except (OSError, sqlite3.Error) as exc:
        audited = False
        click.echo(
            f"warning: the backup is complete but could not be recorded in the audit trail: {exc}",
            err=True,
        )
    if fmt == "json":
        echo_json(
            {
                "database": db,
                "out": out,
                "bytes": size,
                "schema_version": version,
                "audited": audited,
            }
        )
    else:
        click.echo(f"backed up {db} to {out} ({_size(size)}, schema version {version})")


@click.command("restore")
@click.option("--in", "in_path", required=True, metavar="FILE", help="A file written by `backup`.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace a database that already holds rules, clients, users or tokens. "
    "Never overrides the checks on FILE or the refusal while the server runs.",
)
@format_option
@click.pass_obj
def restore(obj: OperatorContext, in_path: str, force: bool, fmt: str) -> None:
    """Replace state.db with a backup. The server must be stopped.

    FILE is checked first (a SQLite database written by Portunus, intact, with a
    schema no newer than this version — a newer one exits 78) and migrated to
    this version. The current database is kept as state.db.bak-<time>; without
    --force, one that holds rules, clients, users or tokens is not replaced.
    Start the server afterwards: the backup's rules are applied again.

    \b
    Example:
      systemctl stop portunus
      portunus-server restore --in /root/portunus.db --force
      systemctl start portunus
    """
    hint_vars(data_dir=obj.data_dir)
    require_db_access(obj.db_path, "restore")
    refuse_if_running(obj, "restore")
    try:
        result = replace.restore(obj.db_path, in_path, local_actor(), force=force)
    except OSError as exc:
        raise _io_error(exc) from None
    if fmt == "json":
        echo_json(result)
        return
    migrated = result["from_schema_version"] != result["schema_version"]
    schema = (
        f"schema version {result['from_schema_version']} -> {result['schema_version']}"
        if migrated
        else f"schema version {result['schema_version']}"
    )
    click.echo(
        f"restored {result['source']} into {result['database']} ({result['rules']} rules, {schema})"
    )
    if result["previous"]:
        click.echo(f"the previous database is kept as {result['previous']}")
    click.echo(
        "start the server to apply the restored rules (systemctl start portunus, "
        "or portunus-server serve)"
    )


@click.command("reset")
@click.option("--confirm", is_flag=True, help="Required: yes, start over with an empty database.")
@format_option
@click.pass_obj
def reset(obj: OperatorContext, confirm: bool, fmt: str) -> None:
    """Start over: move state.db aside so the next start is empty. Server stopped.

    Every rule, user, API token and enrolled client goes with it (edges must
    enroll again); the operator token file and the TLS key stay. Nothing is
    deleted: the database is kept as state.db.bak-<time>, and
    `restore --in` that file undoes the reset.

    \b
    Example:
      systemctl stop portunus && portunus-server reset --confirm && systemctl start portunus
    """
    hint_vars(data_dir=obj.data_dir)
    if not confirm:
        raise PortunusError(
            "validation.confirm_required",
            "reset moves every rule, user, token and enrolled client aside; add --confirm to do it",
            field="confirm",
        )
    require_db_access(obj.db_path, "reset")
    refuse_if_running(obj, "reset")
    try:
        moved = replace.reset(obj.db_path)
    except OSError as exc:
        raise _io_error(exc) from None
    if fmt == "json":
        echo_json({"database": obj.db_path, "moved_to": moved})
    elif moved is None:
        click.echo(f"no database at {obj.db_path}; nothing to reset")
    else:
        click.echo(
            f"moved {obj.db_path} to {moved}\n"
            "the next start begins with an empty database "
            f"(undo: portunus-server restore --in {moved})"
        )
