"""Port slots: which rules may share a listening port on one (client, protocol).

Any overlap is a ``port_conflict`` except TLS SNI rules sharing one TCP port.
A (client, port) keeps the mode of its first rule for as long as it holds any
rule.  The mode is recorded on the rules
themselves, so control and data plane read it from the same rule table: a port
is in SNI mode while any rule there has a pattern or is marked ``sni_fallback``.
A rule without a pattern pushed onto an SNI port is its (single) fallback and
gets that mark, which keeps the port in SNI mode when its SNI rules are removed
and replaced; an SNI rule pushed onto a plain port is refused (remove the plain
rule first).  ``failed`` rules keep
their slot (the operator sees them and removes them); ``draining`` rules have
already given theirs up, so remove-then-push on the same port works at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from portunus.errors import PortunusError
from portunus.rules import Rule
from portunus.text import is_ascii_digits


def _overlaps(a: Rule, b: Rule) -> bool:
    return (
        a.protocol == b.protocol
        and a.listen_start <= b.listen_end
        and b.listen_start <= a.listen_end
    )


def _ports(r: Rule) -> str:
    return f"{r.listen_start}-{r.listen_end}" if r.is_range else str(r.listen_start)


def _conflict(new: Rule, old: Rule, why: str) -> PortunusError:
    return PortunusError(
        "port_conflict",
        f"{new.protocol} port {_ports(new)} on client {new.client}: {why} (rule {old.id})",
        conflicting_rule=int(old.id) if is_ascii_digits(old.id) else old.id,
    )


def check_slot(new: Rule, existing: Iterable[Rule]) -> Rule:
    """Raise unless ``new`` fits next to ``existing`` (rules of the same client
    that still hold their slots; non-overlapping ones are ignored).

    Returns the rule to store: ``new`` itself, or ``new`` marked ``sni_fallback``
    when it is the fallback of an SNI-mode port.
    """
    on_port = [r for r in existing if _overlaps(new, r)]
    if not on_port:
        return new
    for old in on_port:
        if new.is_range or old.is_range:
            raise _conflict(new, old, "the ports overlap an existing rule")
    # From here every rule involved is a single-port TCP/UDP rule on the same port.
    sni_mode = any(r.sni is not None or r.sni_fallback for r in on_port)
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
        return new.with_changes(sni_fallback=True)
    same = next((r for r in on_port if r.sni == new.sni), None)
    if same is not None:
        raise _conflict(new, same, f"SNI pattern {new.sni!r} is already routed on this port")
    return new
