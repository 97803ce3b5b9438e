"""The capability gate: a rule is refused before it is stored when the client's
``hello`` did not advertise a feature the rule needs (issue 6 part 6).

Only remote clients are gated: ``local`` runs this very build.  The error code is
``<feature>_unsupported_by_client`` (422, ``errors.classify``).
"""

from __future__ import annotations

from collections.abc import Iterable

from portunus.errors import PortunusError
from portunus.rules import Rule

_WHAT = {
    "sni": "TLS SNI routing (--sni)",
    "udp": "UDP forwarding",
    "proxy_protocol": "PROXY protocol headers",
    "range": "port-range rules",
    "rate_limit": "rate limits (--bandwidth-*/--new-connections-per-sec/--concurrent-connections)",
    "idle_timeout": "per-rule idle timeouts (--idle-timeout)",
}


def required_capabilities(rule: Rule) -> list[str]:
    """The capability names of docs/edge.md that ``rule`` needs, beyond plain TCP."""
    needs: list[str] = []
    if rule.sni is not None:
        needs.append("sni")
    if rule.protocol == "udp":
        needs.append("udp")
    if rule.proxy_protocol is not None or any(t.proxy_protocol is not None for t in rule.targets):
        needs.append("proxy_protocol")
    if rule.is_range:
        needs.append("range")
    if rule.rate_limit:
        # A client that does not enforce caps would forward the rule unlimited.
        needs.append("rate_limit")
    if rule.idle_timeout_secs is not None:
        # A client that does not know it would keep idle connections open for ever.
        needs.append("idle_timeout")
    return needs


def check_capabilities(
    rule: Rule, advertised: Iterable[str], client_name: str, client_id: str
) -> None:
    have = set(advertised)
    for cap in required_capabilities(rule):
        if cap not in have:
            raise PortunusError(
                f"{cap}_unsupported_by_client",
                f"client {client_name} ({client_id}) does not support {_WHAT[cap]} "
                f"(it advertised: {', '.join(sorted(have)) or 'nothing'}); nothing was stored",
                client_id=client_id,
                capability=cap,
            )
