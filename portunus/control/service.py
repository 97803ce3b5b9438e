"""The rule lifecycle (control process): push, update, remove, and the answers
of the data plane.

``pending`` → ``active`` | ``failed(reason)``; remove → ``draining`` → gone.
A rule is committed as ``pending`` (with its audit row) before it is sent, so a
crash anywhere after the commit loses nothing: the node gets the full set on the
next (re)connect.  The data plane's answers arrive through ``DataPlaneEvents``
and are applied by one worker task in arrival order; a push waits for the answer
about its rule up to its ack budget, and an answer that comes later is applied
all the same (the rule flips from ``pending`` when it arrives).
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from portunus.bounds import ACK_TIMEOUT, RULE_ID
from portunus.config import Settings
from portunus.control.auth import Principal
from portunus.control.dataplane import LOCAL, DataPlane, RuleResult
from portunus.control.fleet.capabilities import check_capabilities
from portunus.control.grants import check_grants
from portunus.control.rule_body import parse_rule_body
from portunus.control.rule_list import KIND as RULES_KIND
from portunus.control.rule_list import list_filters, list_page
from portunus.control.rule_update import parse_rule_update
from portunus.control.slots import check_slot
from portunus.control.store import Store, accounts, audit_refusal, write_audit
from portunus.control.store import owner_caps as owner_caps_db
from portunus.control.store import rules as rules_db
from portunus.control.store import users as users_db
from portunus.control.store.accounts import OPERATOR_USER, ClientRow
from portunus.control.store.paging import page
from portunus.control.store.rules import StoredRule
from portunus.errors import PortunusError, ValidationError
from portunus.logs import log_event
from portunus.rules import Rule
from portunus.text import is_ascii_digits

MAX_ACK_TIMEOUT_SECS = ACK_TIMEOUT.hi
# Called after every committed state change; state None = the rule is gone.
StateSink = Callable[[Rule, str | None], None]


def parse_rule_id(params: dict[str, Any]) -> int:
    raw = params.get("id")
    if isinstance(raw, str) and is_ascii_digits(raw.strip()) and len(raw.strip()) <= 19:
        raw = int(raw.strip())
    if not isinstance(raw, int) or not RULE_ID.contains(raw):
        raise ValidationError(
            "validation.id", "id must be a rule id (a positive integer)", field="id"
        )
    return raw


def _rule_key(key: object) -> int | None:
    """A rule id a data plane answered about, or None: the answer comes from an edge
    client, and a 20-digit id would overflow SQLite and stop the answer worker."""
    text = str(key)
    if not is_ascii_digits(text) or len(text) > 19:
        return None
    value = int(text)
    return value if RULE_ID.contains(value) else None


# Node events handled together (see RuleService._handle_batch).
EVENT_BATCH = 500


def _unchanged(state: str, failure_reason: str | None, res: RuleResult) -> bool:
    """A draining rule is never revived by a late answer about it; an unchanged
    state (a re-sync, a caps update) writes nothing."""
    return state in ("draining", "revoked") or (state == res.state and failure_reason == res.reason)


def _ack_timeout(params: dict[str, Any], default: float) -> float:
    return float(ACK_TIMEOUT.check(params.get("ack_timeout", default), "ack_timeout"))


class RuleService:
    """One instance per control process; also the ``DataPlaneEvents`` sink."""

    def __init__(
        self,
        store: Store,
        dataplane: DataPlane,
        settings: Settings,
        on_state: StateSink | None = None,
    ) -> None:
        self.store = store
        self.dataplane = dataplane
        self.settings = settings
        self.on_state = on_state or (lambda rule, state: None)
        self._events: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        self._waiters: dict[int, list[asyncio.Future[StoredRule]]] = {}
        self._worker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start applying data-plane answers (call inside the running loop)."""
        self._worker = asyncio.get_running_loop().create_task(self._run_events())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def drain_events(self) -> None:
        """Wait until every queued data-plane answer is applied (tests, shutdown)."""
        await self._events.join()

    # ------------------------------------------------------ DataPlaneEvents

    def rules_applied(self, client_id: str, results: dict[str, RuleResult]) -> None:
        self._events.put_nowait(("applied", client_id, results))

    def rules_removed(self, client_id: str, ids: list[str]) -> None:
        self._events.put_nowait(("removed", client_id, ids))

    def client_connected(self, client_id: str) -> None:
        self._events.put_nowait(("connected", client_id, None))

    def backlog(self) -> int:
        """Node events not handled yet (the gateway sheds hellos when this is deep)."""
        return self._events.qsize()

    async def _run_events(self) -> None:
        while True:
            batch = [await self._events.get()]
            while len(batch) < EVENT_BATCH and not self._events.empty():
                batch.append(self._events.get_nowait())
            try:
                await self._handle_batch(batch)
            finally:
                for _ in batch:
                    self._events.task_done()

    async def _handle_batch(self, batch: list[tuple[str, str, Any]]) -> None:
        """What queued up while the last batch ran, a few queries for all of it.

        After a restart the whole fleet's connects and answers queue here; one
        query per client (several awaits each on the store's thread) made the queue
        drain at the pace of the event loop's turns.  Syncs go first, then answers,
        then removals: a client's sync does not depend on its answers (states), and
        an answer never touches a draining rule, so the order between kinds does not
        change the outcome; within a kind, arrival order is kept."""
        connected = [c for kind, c, _ in batch if kind == "connected"]
        applied = [(c, p) for kind, c, p in batch if kind == "applied"]
        if connected:
            try:
                await self._sync_clients(connected)
            except Exception:  # noqa: BLE001 - then one by one: one bad client must not hold the rest
                for client_id in connected:
                    await self._one_event("connected", client_id, self.sync_client(client_id))
        if applied:
            try:
                await self._apply_results_batch(applied)
            except Exception:  # noqa: BLE001 - then one by one (an answer applied twice is a no-op)
                for client_id, results in applied:
                    await self._one_event(
                        "applied", client_id, self._apply_results(client_id, results)
                    )
        for kind, client_id, payload in batch:
            if kind == "removed":
                await self._one_event(kind, client_id, self._apply_removed(client_id, payload))

    async def _one_event(self, kind: str, client_id: str, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:  # noqa: BLE001 - one bad answer must not stop the worker
            log_event(
                "control.event_failed",
                level="error",
                kind=kind,
                client_id=client_id,
                traceback=traceback.format_exc(),
            )

    # --------------------------------------------------------------- sync

    async def sync_client(self, client_id: str) -> None:
        """Send a (re)connected node its full rule set; removals still draining are
        re-sent so their rows go away once the node confirms them."""
        async with self.store.read() as db:
            stored = await rules_db.list_rules(db, client_id=client_id)
            caps = await owner_caps_db.caps_by_owner(db, client_id)
        await self._send_sync(client_id, stored, caps)

    async def _sync_clients(self, client_ids: list[str]) -> None:
        """``sync_client`` for many: the remote clients' rules and caps are read in
        one go, and each sync is sent right after (a remote send does not yield, so
        no push can commit between the read and the sync that must include it)."""
        remote = [c for c in dict.fromkeys(client_ids) if c != LOCAL]
        if LOCAL in client_ids:
            await self.sync_client(LOCAL)
        if not remote:
            return
        async with self.store.read() as db:
            stored = await rules_db.rules_of_clients(db, remote)
            caps = await owner_caps_db.caps_of_clients(db, remote)
        for client_id in remote:
            await self._send_sync(client_id, stored[client_id], caps[client_id])

    async def _send_sync(
        self, client_id: str, stored: list[StoredRule], caps: dict[str, dict[str, int]]
    ) -> None:
        keep = [s for s in stored if s.state != "draining"]
        gone = [str(s.rule_id) for s in stored if s.state == "draining"]
        for s in stored:
            self.on_state(s.rule, s.state)
        # Owner caps first: the rules then start inside their owners' envelopes.
        await self.dataplane.owner_caps(client_id, caps)
        await self.dataplane.sync(client_id, [s.rule for s in keep])
        if gone:
            await self.dataplane.apply(client_id, [], gone)

    async def forget_draining(self, client_id: str) -> None:
        """At control start: delete rows left ``draining`` by a previous control
        process.  A fresh supervisor holds nothing and would never confirm them; a
        supervisor that outlived us drains them anyway once the sync leaves them
        out (draining rules hold no port slot, so the early delete frees nothing)."""
        async with self.store.write() as db:
            stale = [
                s
                for s in await rules_db.list_rules(db, client_id=client_id)
                if s.state == "draining"
            ]
            for s in stale:
                await rules_db.delete_rule(db, s.rule_id)
                await write_audit(
                    db, "system", "rule.removed", f"rule:{s.rule_id}", details={"at_start": True}
                )
        for s in stale:
            self.on_state(s.rule, None)
            log_event("rule.removed", rule=s.rule_id, client=s.rule.client, at_start=True)

    async def _apply_results(self, client_id: str, results: dict[str, RuleResult]) -> None:
        await self._apply_results_batch([(client_id, results)])

    async def _apply_results_batch(
        self, answers_of: list[tuple[str, dict[str, RuleResult]]]
    ) -> None:
        """Nodes' answers, in arrival order.  Read first, in one query for all of
        them: after a restart every node re-confirms what is already recorded, and
        those answers need no write transaction at all.  That read takes each rule's
        state only; a whole rule is read only for a push waiting on its answer."""
        parsed: list[tuple[str, dict[int, RuleResult]]] = []
        for client_id, results in answers_of:
            answers: dict[int, RuleResult] = {}
            for key, res in results.items():
                rule_id = _rule_key(key)
                if rule_id is not None:
                    answers[rule_id] = res
            parsed.append((client_id, answers))
        wanted = list(dict.fromkeys(r for _, answers in parsed for r in answers))
        waited = [r for r in wanted if r in self._waiters]
        async with self.store.read() as db:
            current = await rules_db.states_of(db, wanted)
            full = {s.rule_id: s for s in await rules_db.get_rules(db, waited)} if waited else {}
        written: set[int] = set()  # changed by an earlier answer: read again when writing
        for client_id, answers in parsed:
            settled: list[StoredRule] = []
            to_write: list[int] = []
            for rule_id, res in answers.items():
                now = current.get(rule_id)
                if now is None or now.client_id != client_id:
                    continue
                if rule_id not in written and _unchanged(now.state, now.failure_reason, res):
                    if rule_id in full:  # settling a rule nobody waits for does nothing
                        settled.append(full[rule_id])
                else:
                    to_write.append(rule_id)
            changed: list[tuple[StoredRule, str]] = []
            if to_write:
                changed, more = await self._write_results(client_id, to_write, answers)
                settled.extend(more)
                written.update(new.rule_id for new, _ in changed)
            self._after_results(changed, settled)

    def _after_results(
        self, changed: list[tuple[StoredRule, str]], settled: list[StoredRule]
    ) -> None:
        for new, old_state in changed:
            self.on_state(new.rule, new.state)
            if new.state == "active":
                log_event(
                    "rule.activated", rule=new.rule_id, client=new.rule.client, previous=old_state
                )
            else:
                log_event(
                    "rule.failed",
                    level="warning",
                    rule=new.rule_id,
                    client=new.rule.client,
                    reason=new.failure_reason,
                )
        for s in settled:
            self._settle(s)

    async def _write_results(
        self, client_id: str, rule_ids: list[int], answers: dict[int, RuleResult]
    ) -> tuple[list[tuple[StoredRule, str]], list[StoredRule]]:
        """Record the answers that change a rule's state (read again inside the
        transaction: a remove may have landed since the first read)."""
        changed: list[tuple[StoredRule, str]] = []
        settled: list[StoredRule] = []
        async with self.store.write() as db:
            for stored in await rules_db.get_rules(db, rule_ids):
                res = answers[stored.rule_id]
                if stored.client_id != client_id:
                    continue
                if _unchanged(stored.state, stored.failure_reason, res):
                    settled.append(stored)
                    continue
                reason = res.reason if res.state == "failed" else None
                await rules_db.set_state(db, stored.rule_id, res.state, reason)
                await write_audit(
                    db,
                    "system",
                    "rule.state",
                    f"rule:{stored.rule_id}",
                    outcome="ok" if res.state == "active" else "error",
                    error_code=None if res.state == "active" else "activation_failed",
                    details={"from": stored.state, "to": res.state, "reason": reason},
                )
                new = StoredRule(
                    stored.rule_id,
                    stored.client_id,
                    stored.rule,
                    res.state,
                    reason,
                    stored.created_at,
                )
                changed.append((new, stored.state))
                settled.append(new)
        return changed, settled

    async def _apply_removed(self, client_id: str, ids: list[str]) -> None:
        deleted: list[StoredRule] = []
        async with self.store.write() as db:
            for key in ids:
                rule_id = _rule_key(key)
                if rule_id is None:
                    continue
                stored = await rules_db.get_rule(db, rule_id)
                if stored is None or stored.client_id != client_id or stored.state != "draining":
                    continue
                await rules_db.delete_rule(db, stored.rule_id)
                await write_audit(db, "system", "rule.removed", f"rule:{stored.rule_id}")
                deleted.append(stored)
        for s in deleted:
            self.on_state(s.rule, None)
            log_event("rule.removed", rule=s.rule_id, client=s.rule.client)

    def _settle(self, stored: StoredRule) -> None:
        for fut in self._waiters.pop(stored.rule_id, []):
            if not fut.done():
                fut.set_result(stored)

    async def _send_and_wait(self, stored: StoredRule, timeout: float) -> StoredRule | None:
        """Send one upsert and wait for the answer about it; None on timeout."""
        fut: asyncio.Future[StoredRule] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(stored.rule_id, []).append(fut)
        try:
            await self.dataplane.apply(stored.client_id, [stored.rule], [])
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiters.get(stored.rule_id)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiters[stored.rule_id]

    # ---------------------------------------------------------- operations

    async def _audit_error(
        self, principal: Principal, action: str, target: str | None, exc: PortunusError
    ) -> None:
        """A refused operation changes nothing but is still on the record."""
        await audit_refusal(self.store, principal.user, action, target, exc)
        exc.audited = True  # the dispatcher need not audit it again

    async def _owner(
        self, principal: Principal, requested: Any, client: ClientRow, rule: Rule
    ) -> str:
        """Who owns the new rule, and may they push it (their grants)?

        A ``user`` owns what it pushes and needs a grant covering it; a
        superadmin owns it too, or names another owner (``owner``) whose grants
        are then checked.  The operator token is a machine credential: its
        rules have no owner (visible to superadmins only), as before users.
        """
        if requested is not None and (not isinstance(requested, str) or len(requested) > 64):
            raise ValidationError("validation.owner", "owner must be a user id", field="owner")
        if not principal.is_superadmin:
            if requested not in (None, "", principal.user):
                raise PortunusError(
                    "role_required",
                    "only a superadmin may push a rule for another owner",
                    required_role="superadmin",
                )
            requested = principal.user
        elif not requested:
            return "" if principal.user == OPERATOR_USER else principal.user
        async with self.store.read() as db:
            owner = await users_db.require_user(db, requested)
            grants = await users_db.list_grants(db, owner.id) if owner.role != "superadmin" else []
        if owner.role != "superadmin":
            check_grants(
                grants,
                owner.name,
                client.client_id,
                client.name,
                rule.protocol,
                rule.listen_start,
                rule.listen_end,
            )
        return owner.name

    async def push(self, principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in params.items() if k not in ("ack_timeout", "owner")}
        target = f"client:{body.get('client', 'local')}"
        try:
            timeout = _ack_timeout(params, self.settings.ack_timeout_secs)
            rule, client_ref = parse_rule_body(body, self.settings.range_rule_max_ports)
            async with self.store.read() as db:
                client = await accounts.resolve_client(db, client_ref)
            target = f"client:{client.client_id}"
            owner = await self._owner(principal, params.get("owner"), client, rule)
            if not self.dataplane.connected(client.client_id):
                raise PortunusError(
                    "client_not_connected",
                    f"client {client.name} ({client.client_id}) is not connected; nothing was stored",
                    client_id=client.client_id,
                )
            if client.client_id != LOCAL:
                info = self.dataplane.info(client.client_id)
                check_capabilities(
                    rule, info.capabilities if info else [], client.name, client.client_id
                )
            rule = rule.with_changes(client=client.name, owner=owner)
            async with self.store.write() as db:
                existing = await rules_db.rules_overlapping(
                    db, client.client_id, rule.protocol, rule.listen_start, rule.listen_end
                )
                rule = check_slot(rule, [s.rule for s in existing])
                rule_id = await rules_db.insert_rule(db, client.client_id, rule)
                await write_audit(
                    db,
                    principal.user,
                    "rule.push",
                    f"rule:{rule_id}",
                    details={
                        "client_id": client.client_id,
                        "token_id": principal.token_id,
                        "owner": owner,
                    },
                )
                stored = await rules_db.get_rule(db, rule_id)
            assert stored is not None
        except PortunusError as exc:
            await self._audit_error(principal, "rule.push", target, exc)
            raise
        self.on_state(stored.rule, "pending")
        log_event(
            "rule.pushed",
            rule=stored.rule_id,
            client=client.name,
            user=principal.user,
            protocol=rule.protocol,
            listen=f"{rule.listen_start}-{rule.listen_end}"
            if rule.is_range
            else str(rule.listen_start),
        )
        answered = await self._send_and_wait(stored, timeout)
        if answered is None:
            raise PortunusError(
                "ack_timeout",
                f"client {client.name} did not confirm rule {stored.rule_id} within {timeout:g} s; "
                "it stays pending and becomes active or failed when the answer arrives",
                rule=await self._rule_json(stored.rule_id, stored),
            )
        if answered.state == "failed":
            raise PortunusError(
                "activation_failed",
                answered.failure_reason or "the data plane refused the rule",
                rule=answered.to_json(),
            )
        return answered.to_json()

    async def _rule_json(self, rule_id: int, fallback: StoredRule) -> dict[str, Any]:
        async with self.store.read() as db:
            current = await rules_db.get_rule(db, rule_id)
        return (current or fallback).to_json()

    async def get_rule(self, params: dict[str, Any]) -> dict[str, Any]:
        rule_id = parse_rule_id(params)
        async with self.store.read() as db:
            return (await rules_db.require_rule(db, rule_id)).to_json()

    async def list_rules(self, params: dict[str, Any]) -> dict[str, Any]:
        """One page: ``{rules, next_cursor, total}`` (control.rule_list); ``total``
        counts every rule matching the filters, from an index."""
        client_id: str | None = None
        owner = params.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise ValidationError("validation.owner", "owner must be a string", field="owner")
        filters = list_filters(params)
        limit, after = list_page(params)
        async with self.store.read() as db:
            if params.get("client") is not None:
                # A revoked client's rules stay listed (state "revoked").
                client_id = (
                    await accounts.resolve_client(db, params["client"], include_revoked=True)
                ).client_id
            found = await rules_db.list_rules(
                db, client_id=client_id, owner=owner, **filters, limit=limit + 1, after=after
            )
            total = await rules_db.count_rules(db, client_id, owner, **filters)
        shown, next_cursor = page(found, limit, RULES_KIND, key=lambda s: (s.rule_id,))
        return {"rules": [s.to_json() for s in shown], "next_cursor": next_cursor, "total": total}

    async def update(self, principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Hot-update the caps; the node answers like for a push (within the default
        ack budget).  No answer in time is not an error here: the change is stored
        and the node gets it on reconnect at the latest."""
        target = f"rule:{params.get('id')}"
        try:
            rule_id = parse_rule_id(params)
            async with self.store.write() as db:
                stored = await rules_db.require_rule(db, rule_id)
                if stored.state == "draining":
                    raise PortunusError("conflict", f"rule {rule_id} is being removed", id=rule_id)
                changes = parse_rule_update(params, stored.rule)  # rate_limit and/or targets
                details: dict[str, Any] = {}
                if "rate_limit" in changes:
                    await rules_db.set_rate_limit(db, rule_id, changes["rate_limit"])
                    details.update(
                        rate_limit=changes["rate_limit"], previous=stored.rule.rate_limit
                    )
                if "targets" in changes:
                    if stored.client_id != LOCAL:
                        info = self.dataplane.info(stored.client_id)
                        if info is not None:
                            check_capabilities(
                                stored.rule.with_changes(targets=changes["targets"]),
                                info.capabilities,
                                stored.rule.client,
                                stored.client_id,
                            )
                    await rules_db.set_targets(db, rule_id, changes["targets"])
                    details.update(
                        targets=[t.label for t in changes["targets"]],
                        previous_targets=[t.label for t in stored.rule.targets],
                    )
                await write_audit(db, principal.user, "rule.update", target, details=details)
                updated = await rules_db.get_rule(db, rule_id)
            assert updated is not None
        except PortunusError as exc:
            await self._audit_error(principal, "rule.update", target, exc)
            raise
        if self.dataplane.connected(updated.client_id):
            answered = await self._send_and_wait(updated, self.settings.ack_timeout_secs)
            updated = answered or updated
        return await self._rule_json(updated.rule_id, updated)

    async def remove(self, principal: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Mark draining and tell the node; the row goes when the node confirms.

        Deleted at once instead when nothing can be draining: the node is away
        (it drops the rule when it gets its full set on reconnect) or the rule
        failed (nothing was ever bound).  The node is told in every case.
        """
        target = f"rule:{params.get('id')}"
        try:
            rule_id = parse_rule_id(params)
            async with self.store.write() as db:
                stored = await rules_db.require_rule(db, rule_id)
                connected = self.dataplane.connected(stored.client_id)
                immediate = not connected or stored.state == "failed"
                if immediate:
                    await rules_db.delete_rule(db, rule_id)
                    await write_audit(
                        db, principal.user, "rule.remove", target, details={"immediate": True}
                    )
                elif stored.state != "draining":
                    await rules_db.set_state(db, rule_id, "draining", None)
                    await write_audit(db, principal.user, "rule.remove", target)
        except PortunusError as exc:
            await self._audit_error(principal, "rule.remove", target, exc)
            raise
        if immediate:
            self.on_state(stored.rule, None)
            log_event("rule.removed", rule=rule_id, client=stored.rule.client, user=principal.user)
        else:
            self.on_state(stored.rule, "draining")
            self._settle(
                StoredRule(
                    rule_id, stored.client_id, stored.rule, "draining", None, stored.created_at
                )
            )
        if connected:
            await self.dataplane.apply(stored.client_id, [], [str(rule_id)])
        return {}
