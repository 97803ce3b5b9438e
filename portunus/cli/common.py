"""What every Portunus CLI verb shares: the operator context (socket, token),
``--format``, time arguments, and turning a ``PortunusError`` into the contract's
``error: <code>: <message>`` + ``hint:`` lines and exit code.

Errors are raised, never printed-and-exited, inside verbs: ``ReportingGroup``
converts them at the top so the exit code always comes from
``PortunusError.exit_code`` and no verb can forget a hint.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import click

from portunus.cli import output
from portunus.config import resolve_runtime_dir
from portunus.control.rpc.caller import call_sync
from portunus.errors import PortunusError
from portunus.timefmt import parse_when as _when

PROG = "portunus-server"
FORMATS = ("text", "json")
TOKEN_ENV = "PORTUNUS_OPERATOR_TOKEN"
TOKEN_FILE_NAME = "operator.token"
# Where a packaged install keeps a copy of the first token (tried after the data dir).
SYSTEM_TOKEN_FILE = "/etc/portunus/operator.token"
_HINT_KEY = "portunus.hint_vars"


# ------------------------------------------------------------------ errors


def hint_vars(**values: Any) -> None:
    """Remember facts (client, rule id, socket, ...) a hint may name if this verb fails."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta.setdefault(_HINT_KEY, {}).update(values)


def hint_for(err: PortunusError, facts: dict[str, Any]) -> str | None:
    """One line telling the operator what to do next, or None when nothing useful."""
    prog = facts.get("prog", PROG)
    code = err.code
    rule = err.details.get("rule")
    rule_id = rule.get("id") if isinstance(rule, dict) else facts.get("rule_id")
    rid = rule_id if rule_id is not None else "ID"
    if code == "unauthenticated":
        source = facts.get("token_source")
        if source:
            return (
                f"the token from {source} was refused; mint a new one with "
                f"`{prog} bootstrap-superadmin --name NAME` or use the one `serve` wrote"
            )
        if err.details.get("denied"):
            group, user = err.details.get("group"), err.details.get("user", "USER")
            who = (
                (
                    f"as root or as a member of group {group} (`usermod -aG {group} {user}`, "
                    "then log in again)"
                )
                if group
                else "as root or the owner of the token file"
            )
            return f"run the CLI {who}, or export {TOKEN_ENV}=TOKEN with a token you were given"
        data_dir = facts.get("data_dir", "<data-dir>")
        return (
            f"give a token in one of three ways: export {TOKEN_ENV}=TOKEN, "
            f"pass --token-file FILE, or make {os.path.join(data_dir, TOKEN_FILE_NAME)} "
            "readable (the first `serve` writes it)"
        )
    if code == "unavailable" and err.details.get("denied"):
        group = _reading_group(facts["socket"]) if facts.get("socket") else None
        if group:
            return f"run the CLI as root or as a member of group {group} (`usermod -aG {group} {_user()}`)"
        return "run the CLI as root or as the user `serve` runs as"
    if code == "unavailable":
        data_dir = facts.get("data_dir", "<data-dir>")
        return (
            f"start it with `{prog} --data-dir {data_dir} serve`; a server on another data dir "
            "needs the same --data-dir, or --socket / PORTUNUS_SOCKET at its control.sock"
        )
    if code == "client_not_connected":
        return f"the client is enrolled but offline; `{prog} list-clients` shows who is connected"
    if code in ("client_not_found", "ambiguous_client"):
        return f"`{prog} list-clients` shows client names and ids; an id is always unambiguous"
    if code == "port_conflict":
        client = facts.get("client", "CLIENT")
        return f"see which rule holds the port: `{prog} list-rules --client {client}`"
    if code == "activation_failed":
        return f"the rule is kept as failed; remove it with `{prog} remove-rule {rid}`"
    if code == "ack_timeout":
        return f"rule {rid} is pending and turns active or failed when the client answers; check `{prog} list-rules`"
    if code == "rule_not_found":
        return f"`{prog} list-rules` shows the rule ids"
    if code == "conflict.legacy_to_sni_unsupported":
        return "a port is plain TCP or SNI-routed for its whole life; remove the existing rule on it first"
    if code == "forbidden" or code in (
        "client_not_granted",
        "port_outside_grant",
        "protocol_not_granted",
    ):
        return f"your token's user lacks a grant for this; ask a superadmin (`{prog} grant-list` shows yours)"
    if code == "role_required":
        return "this needs a superadmin's token"
    if code == "not_owner":
        return f"`{prog} list-rules` shows the rules you own"
    if code == "password_change_required":
        return "change the temporary password first (Web UI, or POST /v1/users/me/password)"
    if code in ("user_not_found", "grant_not_found", "token_not_found"):
        kind = code.split("_")[0]
        return f"`{prog} {kind}-list` shows the {kind}s"
    if code.startswith("validation"):
        verb = facts.get("verb")
        return f"see `{verb} --help` for the accepted forms" if verb else None
    return None


class CliError(click.ClickException):
    """A ``PortunusError`` on its way out of click: prints the contract's lines."""

    def __init__(self, error: PortunusError, hint: str | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.hint = hint
        # click types exit_code as a ClassVar, yet only ever reads it from the instance
        # (``sys.exit(e.exit_code)``); ours depends on the error, so it is per instance.
        self.exit_code = error.exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.error.code}: {self.error.message}", err=True)
        if self.hint:
            click.echo(f"hint: {self.hint}", err=True)


def _to_cli_error(ctx: click.Context, exc: PortunusError) -> CliError:
    facts = dict(ctx.meta.get(_HINT_KEY, {}))
    if ctx.invoked_subcommand and "verb" not in facts:
        facts["verb"] = f"{ctx.command_path} {ctx.invoked_subcommand}"
    facts.setdefault("verb", ctx.command_path)
    return CliError(exc, hint_for(exc, facts))


class ReportingGroup(click.Group):
    """A group whose verbs may raise ``PortunusError`` freely."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PortunusError as exc:
            raise _to_cli_error(ctx, exc) from None


# ------------------------------------------------------------------ output


def format_option(f: Any) -> Any:
    """``--format text|json`` on a verb (text for people, json for scripts)."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="text",
        show_default=True,
        help="text: aligned for people; json: the API's shapes, for scripts.",
    )(f)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


# ------------------------------------------------------------------ time


def parse_when(text: str, now: datetime | None = None) -> str:
    """An operator time (RFC 3339, Unix time, ``now`` or an age like ``1h30m``)
    as RFC 3339 UTC text; raises ValueError with the accepted forms."""
    return _when(text.strip(), now).strftime("%Y-%m-%dT%H:%M:%SZ")


class WhenType(click.ParamType):
    """A click argument type for ``parse_when``."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return parse_when(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


# ------------------------------------------------------------------ operator context


def _read_token(path: str, denied: list[str] | None = None) -> str | None:
    """The stripped token in ``path``; None if unreadable (appended to ``denied`` when
    that is for lack of permission); raises if readable but empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except PermissionError:
        if denied is not None:
            denied.append(path)
        return None
    except (OSError, UnicodeDecodeError):
        return None
    if not text:
        raise PortunusError("unauthenticated", f"token file {path} is empty")
    return text


def resolve_token(token_file: str | None, data_dir: str) -> tuple[str, str]:
    """``(token, where it came from)`` in the contract's order:
    $PORTUNUS_OPERATOR_TOKEN, --token-file, <data-dir>/operator.token,
    /etc/portunus/operator.token.  An explicit --token-file that cannot be read is
    an error, not a silent fall-through to the defaults."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env, TOKEN_ENV
    if token_file:
        token = _read_token(token_file)
        if token is None:
            raise PortunusError(
                "unauthenticated", f"cannot read the token file {token_file} given by --token-file"
            )
        return token, token_file
    denied: list[str] = []
    for path in (os.path.join(data_dir, TOKEN_FILE_NAME), SYSTEM_TOKEN_FILE):
        token = _read_token(path, denied)
        if token is not None:
            return token, path
    if denied:
        raise _denied_error(denied)
    raise PortunusError(
        "unauthenticated",
        f"no operator token: {TOKEN_ENV} is unset, no --token-file was given and "
        f"neither {os.path.join(data_dir, TOKEN_FILE_NAME)} nor {SYSTEM_TOKEN_FILE} is readable",
    )


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _reading_group(path: str) -> str | None:
    """The group whose members may read ``path`` (or enter its directory), if any."""
    for where, bit in ((path, stat.S_IRGRP), (os.path.dirname(path), stat.S_IXGRP)):
        try:
            st = os.stat(where)
            return grp.getgrgid(st.st_gid).gr_name if st.st_mode & bit else None
        except (OSError, KeyError):
            continue
    return None


def _denied_error(denied: list[str]) -> PortunusError:
    """An operator outside the token's group: say so, and who may (exit 4)."""
    user = _user()
    groups = [g for g in (_reading_group(p) for p in denied) if g]
    return PortunusError(
        "unauthenticated",
        f"no operator token this user ({user}) may read: permission denied on {' and '.join(denied)}",
        denied=denied,
        user=user,
        group=groups[0] if groups else None,
    )


@dataclass
class OperatorContext:
    """The group's global options; ``ctx.obj`` of every ``portunus-server`` verb
    (``serve`` reads ``data_dir`` and ``config`` from it)."""

    data_dir: str
    config: str | None = None
    socket: str | None = None
    token_file: str | None = None
    _token: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def socket_path(self) -> str:
        if self.socket:
            return self.socket
        return os.path.join(resolve_runtime_dir(self.data_dir), "control.sock")

    @property
    def db_path(self) -> str:
        return os.path.join(self.data_dir, "state.db")

    def token(self) -> str:
        if self._token is None:
            hint_vars(data_dir=self.data_dir)
            self._token = resolve_token(self.token_file, self.data_dir)
        return self._token[0]

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """One control-socket request with the operator token; raises PortunusError."""
        token = self.token()
        hint_vars(socket=self.socket_path, token_source=self._token[1] if self._token else None)
        try:
            return call_sync(self.socket_path, token, method, params or {}, timeout)
        except ValueError as exc:  # a reply line that is not JSON
            raise PortunusError(
                "internal", f"unreadable reply from the control process: {exc}"
            ) from None
        except OSError as exc:  # reset mid-reply, path too long, ...
            raise PortunusError(
                "unavailable", f"control socket {self.socket_path}: {exc.strerror or exc}"
            ) from None


def call_rule_and_echo(
    obj: OperatorContext,
    method: str,
    params: dict[str, Any],
    fmt: str,
    timeout: float = 30.0,
) -> None:
    """Call a verb that activates a rule (``rules.push``, ``rules.retry``) and print it.

    Shared by push-rule and retry-rule so both treat a failed activation alike: the rule
    exists (failed or pending), so with ``--format json`` it is printed before the error is
    raised, and scripts get its id and ``failure_reason`` to clean up or poll.
    """
    try:
        rule = obj.call(method, params, timeout=timeout)
    except PortunusError as exc:
        if (
            fmt == "json"
            and exc.code in ("activation_failed", "ack_timeout")
            and isinstance(exc.details.get("rule"), dict)
        ):
            echo_json(exc.details["rule"])
        raise
    if fmt == "json":
        echo_json(rule)
    else:
        click.echo(output.rule_line(rule))
