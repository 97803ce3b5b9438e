"""Port slots: which rules may share a listening port on one (client, protocol).

Any overlap is a ``port_conflict`` except TLS SNI rules sharing one TCP port.
A port's mode is derived from the rules on it: it is in SNI mode while any rule
there has a pattern — the same thing the shard derives from its rule table, so
control and data plane can never disagree about a port's mode.  On an SNI port
a rule without a pattern is the (single) fallback; an SNI rule pushed onto a
plain port is refused (remove the plain rule first).  ``failed`` rules keep
their slot (the operator sees them and removes them); ``draining`` rules have
already given theirs up, so remove-then-push on the same port works at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from portunus.errors import PortunusError
from portunus.rules import Rule
from portunus.text import is_ascii_digits


def _overlaps(a: Rule, b: Rule) -> bool:
    return a.protocol == b.protocol and a.listen_start <= b.listen_end and b.listen_start <= a.listen_end


def _ports(r: Rule) -> str:
    return f"{r.listen_start}-{r.listen_end}" if r.is_range else str(r.listen_start)


def _conflict(new: Rule, old: Rule, why: str) -> PortunusError:
    return PortunusError(
        "port_conflict",
        f"{new.protocol} port {_ports(new)} on client {new.client}: {why} (rule {old.id})",
        conflicting_rule=int(old.id) if is_ascii_digits(old.id) else old.id,
    )


def check_slot(new: Rule, existing: Iterable[Rule]) -> None:
    """Raise unless ``new`` fits next to ``existing`` (rules of the same client
    that still hold their slots; non-overlapping ones are ignored)."""
    on_port = [r for r in existing if _overlaps(new, r)]
    if not on_port:
        return
    for old in on_port:
        if new.is_range or old.is_range:
            raise _conflict(new, old, "the ports overlap an existing rule")
    # From here every rule involved is a single-port TCP/UDP rule on the same port.
    sni_mode = any(r.sni is not None for r in on_port)
    if not sni_mode:
        plain = on_port[0]
        if new.sni is not None:
            raise PortunusError(
                "conflict.legacy_to_sni_unsupported",
                f"port {new.listen_start} on client {new.client} runs plain TCP for rule "
                f"{plain.id}; an SNI rule cannot join it — remove rule {plain.id} first",
                conflicting_rule=int(plain.id) if is_ascii_digits(plain.id) else plain.id,
            )
        raise _conflict(new, plain, "the port is taken")
    if new.sni is None:
        fallback = next((r for r in on_port if r.sni is None), None)
        if fallback is not None:
            raise _conflict(new, fallback, "the SNI port already has a fallback rule")
        return
    same = next((r for r in on_port if r.sni == new.sni), None)
    if same is not None:
        raise _conflict(new, same, f"SNI pattern {new.sni!r} is already routed on this port")
