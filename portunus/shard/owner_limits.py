"""Owner caps: one envelope over all of an owner's rules on this node, layered
with each rule's own caps (the tighter wins).

An owner's caps are the same four token buckets / live-connection count as a
rule's (``ratelimit.RuleLimits``), in their own shared files keyed by the owner,
so every shard of the node draws on one envelope.  A connection of a rule with an
owner is admitted only if its rule and its owner both admit it, and its paced
directions take bytes from both buckets (``Pacer``).

A ``Pacer`` reads the rule's and the owner's current bucket at every grant, so a
changed, lifted or added cap reaches open paced connections at once.  The
shard keeps one ``OwnerLimits`` per owner for its whole life (``OwnerTable``):
deleting a cap only detaches its buckets, and setting it again fills the same
object, which open pacers still hold.  A rule with neither its own bandwidth cap
nor an owner bandwidth cap gets no pacer at all: it keeps the splice path.
"""

from __future__ import annotations

from typing import Any

from portunus.shard.ratelimit import RuleLimits, TokenBucket
from portunus.shard.udp_budget import FlowBudget

# Rule files hash "<client>\0<rule id>"; owners hash "\0owner\0<owner>": no overlap.
_OWNER_NAMESPACE = "\0owner"


class OwnerLimits(RuleLimits):
    """The envelope of one owner in this shard process (never released: see module)."""

    CONCURRENT = "owner_concurrent"
    NEW_CONNECTIONS = "owner_new_connections"

    def __init__(self, settings: dict[str, Any], owner: str) -> None:
        super().__init__(settings, _OWNER_NAMESPACE, owner, ("", "", owner))
        self.owner = owner
        self.caps: dict[str, int] | None = None

    def configure(self, rate_limit: dict[str, int] | None) -> None:
        self.caps = dict(rate_limit) if rate_limit else None
        super().configure(rate_limit)

    @property
    def capped(self) -> bool:
        return self.caps is not None

    @property
    def gates_admission(self) -> bool:
        return self.concurrent is not None or self.conn_rate is not None


class PairSlot:
    """The live-connection slots of a connection admitted by both layers."""

    __slots__ = ("rule", "owner")

    def __init__(self, rule: FlowBudget, owner: FlowBudget) -> None:
        self.rule = rule
        self.owner = owner

    def release(self) -> None:
        self.rule.release()
        self.owner.release()


def admit_both(
    rule: RuleLimits | None, owner: OwnerLimits | None, labels: tuple[str, ...]
) -> tuple[bool, Any]:
    """(admitted, slot to release at close) against the rule's caps, then the owner's.

    A refusal by the owner gives back what the rule took, so a refused
    connection costs neither envelope anything.
    """
    rule_slot: FlowBudget | None = None
    if rule is not None:
        ok, rule_slot = rule.admit(labels)
        if not ok:
            return False, None
    if owner is None:
        return True, rule_slot
    ok, owner_slot = owner.admit(labels)
    if not ok:
        if rule is not None:
            rule.unadmit(rule_slot)
        return False, None
    if rule_slot is not None and owner_slot is not None:
        return True, PairSlot(rule_slot, owner_slot)
    return True, rule_slot or owner_slot


class Pacer:
    """One paced direction of a rule with an owner: grants what both buckets allow.

    Same interface as ``TokenBucket`` for ``CopyPump`` (``grant``/``refund``) and
    UDP (``try_take``).
    """

    __slots__ = ("rule", "owner", "attr")

    def __init__(self, rule: RuleLimits | None, owner: OwnerLimits, attr: str) -> None:
        self.rule = rule
        self.owner = owner
        self.attr = attr  # "bw_in" | "bw_out"

    def _buckets(self) -> tuple[TokenBucket | None, TokenBucket | None]:
        rule = getattr(self.rule, self.attr) if self.rule is not None else None
        return rule, getattr(self.owner, self.attr)

    def grant(self, n: int) -> tuple[int, float]:
        first, second = self._buckets()
        if first is None:
            return second.grant(n) if second is not None else (n, 0.0)
        got, wait = first.grant(n)
        if second is None or got <= 0:
            return got, wait
        both, wait = second.grant(got)
        if both < got:
            first.refund(got - both)  # the owner's envelope is the tighter one now
        return both, wait

    def refund(self, n: int) -> None:
        for bucket in self._buckets():
            if bucket is not None:
                bucket.refund(n)

    def try_take(self, n: float) -> bool:
        first, second = self._buckets()
        if first is not None and not first.try_take(n):
            return False
        if second is not None and not second.try_take(n):
            if first is not None:
                first.refund(int(n))
            return False
        return True


def count_open(conns: Any, budget: FlowBudget) -> None:
    """Count a runtime's open connections (TCP or UDP flows) into a new owner
    connection cap: they hold a slot of it from now on and give it back at close,
    so a cap set below the open count admits nothing new until enough have closed."""
    for conn in conns:
        if getattr(conn, "closed", False):
            continue
        budget.hold()
        held = conn.slot
        conn.slot = PairSlot(held, budget) if held is not None else budget


class OwnerTable:
    """A shard's owner caps: ``{owner: OwnerLimits}``, filled by ``owner_caps`` messages."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings  # the shard's live settings dict (config may arrive later)
        self.owners: dict[str, OwnerLimits] = {}

    def get(self, owner: str) -> OwnerLimits:
        """The owner's envelope (uncapped until a cap arrives); made on first use."""
        limits = self.owners.get(owner)
        if limits is None:
            limits = self.owners[owner] = OwnerLimits(self.settings, owner)
        return limits

    def replace(self, caps: dict[str, dict[str, int]]) -> dict[str, FlowBudget | None]:
        """Make the table say ``caps`` (the node's full set).

        Returns the owners whose caps changed, each with its live-connection count
        if that count is new (a connection cap was set where there was none): the
        owner's open connections must be counted into it (``count_open``).
        """
        changed: dict[str, FlowBudget | None] = {}
        for owner in set(self.owners) | set(caps):
            want = caps.get(owner) or None
            limits = self.get(owner)
            if limits.caps != want:
                before = limits.concurrent
                limits.configure(want)
                fresh = limits.concurrent if limits.concurrent is not before else None
                changed[owner] = fresh
        return changed

    def close(self) -> None:
        for limits in self.owners.values():
            limits.close()
        self.owners.clear()
