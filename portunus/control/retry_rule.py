"""``rules.retry`` (``portunus-server retry-rule ID``): bind a failed rule again now.

The data plane already retries a failed rule by itself, with backoff (1 s doubling
to 30 s, supervisor/retry.py); this asks for a try at once, e.g. right after the
operator freed the port.  It re-sends the stored rule as an upsert: a node that
holds the rule as failed tries to bind it, and answers like for a push.
"""

from __future__ import annotations

from typing import Any

from portunus.control.auth import Principal
from portunus.control.service import parse_rule_id
from portunus.control.store import rules as rules_db
from portunus.control.store import write_audit
from portunus.errors import PortunusError


async def retry_rule(service: Any, principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
    """Answer the rule as it is after the try; ``activation_failed`` (exit 6) when it
    still cannot be bound, ``ack_timeout`` when the node did not answer in time."""
    rule_id = parse_rule_id(params)
    async with service.store.write() as db:
        stored = await rules_db.require_rule(db, rule_id)
        if stored.state == "draining":
            raise PortunusError("conflict", f"rule {rule_id} is being removed", id=rule_id)
        await write_audit(
            db, principal.user, "rule.retry", f"rule:{rule_id}", details={"from": stored.state}
        )
    if not service.dataplane.connected(stored.client_id):
        raise PortunusError(
            "client_not_connected",
            f"client {stored.rule.client} ({stored.client_id}) is not connected; it retries by itself "
            "when it is back",
            client_id=stored.client_id,
        )
    timeout = service.settings.ack_timeout_secs
    answered = await service._send_and_wait(stored, timeout)
    if answered is None:
        raise PortunusError(
            "ack_timeout",
            f"no answer about rule {rule_id} within {timeout:g} s",
            rule=stored.to_json(),
        )
    if answered.state == "failed":
        raise PortunusError(
            "activation_failed",
            answered.failure_reason or "the data plane refused the rule",
            rule=answered.to_json(),
        )
    return answered.to_json()
