"""Grants: what a ``user`` may push, and the check every push goes through.

A push by a user needs ONE grant covering its client, its protocol and its
whole listen range; two adjacent grants do not add up.  Refusals come in the
contract's order (``client_not_granted``, ``protocol_not_granted``,
``port_outside_grant``) and say what is missing, so the user can ask a
superadmin for exactly that.  Targets are not gated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from portunus.control.store.users import GrantRow
from portunus.errors import PortunusError, ValidationError
from portunus.schema.types import PROTOCOLS

NOTE_MAX = 256


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def check_grants(
    grants: Sequence[GrantRow],
    user: str,
    client_id: str,
    client_name: str,
    protocol: str,
    lo: int,
    hi: int,
) -> None:
    """Raise the first refusal in contract order; return when one grant covers all."""
    on_client = [g for g in grants if g.covers_client(client_id)]
    if not on_client:
        raise PortunusError(
            "client_not_granted",
            f"user {user} has no grant on client {client_name} ({client_id}); a superadmin can add one: "
            f"grant-add {user} --client {client_name} --ports {_span(lo, hi)} --protocols {protocol}",
            client_id=client_id,
            user_id=user,
        )
    with_proto = [g for g in on_client if protocol in g.protocols]
    if not with_proto:
        held = sorted({p for g in on_client for p in g.protocols})
        raise PortunusError(
            "protocol_not_granted",
            f"user {user} may use only {', '.join(held)} on client {client_name}; {protocol} is not granted",
            client_id=client_id,
            protocol=protocol,
            user_id=user,
        )
    if any(g.port_start <= lo and hi <= g.port_end for g in with_proto):
        return
    ranges = ", ".join(g.ports() for g in with_proto)
    raise PortunusError(
        "port_outside_grant",
        f"listen ports {_span(lo, hi)} ({protocol}) on client {client_name} are not inside one grant of "
        f"user {user} (granted: {ranges}); one grant must cover the whole range",
        client_id=client_id,
        protocol=protocol,
        ports=_span(lo, hi),
        granted=ranges,
        user_id=user,
    )


def ordered_range(lo: int, hi: int) -> tuple[int, int]:
    """A grant's listen ports (their type and range are the GrantBody declaration's)."""
    if lo > hi:
        raise ValidationError(
            "validation.port_range", f"port range {lo}-{hi} is reversed", field="ports"
        )
    return lo, hi


def grant_protocols(value: Sequence[str] | None) -> tuple[str, ...]:
    """The granted protocols in canonical order; tcp when none is given."""
    return tuple(p for p in PROTOCOLS if p in (value or ("tcp",)))


def parse_note(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > NOTE_MAX or any(ord(c) < 32 for c in value):
        raise ValidationError(
            "validation.note", f"note must be text of at most {NOTE_MAX} characters", field="note"
        )
    return value or None
