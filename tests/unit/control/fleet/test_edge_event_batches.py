"""The rule service handles the node events that queued up together (a reconnect
storm): every client still gets its own full sync, answers that change a state are
recorded (and audited) one by one, answers that confirm it write nothing, and a
batch that fails falls back to one event at a time."""

from __future__ import annotations

from typing import Any

from portunus.control.dataplane import RuleResult

PUSH: dict[str, Any] = {"targets": [{"host": "127.0.0.1", "port": 9090}]}


async def _fleet(edge: Any, n: int) -> tuple[list[Any], list[str], list[int]]:
    fakes, ids, rules = [], [], []
    for i in range(n):
        e, enrolled = await edge.connect(f"edge-{i:02d}")
        rule = await edge.call(
            "rules.push", {**PUSH, "listen_port": 19100 + i, "client": enrolled["client_id"]}
        )
        assert rule["state"] == "active"
        fakes.append(e)
        ids.append(enrolled["client_id"])
        rules.append(rule["id"])
    return fakes, ids, rules


async def _rule_audit(edge: Any) -> list[dict[str, Any]]:
    rows = (await edge.call("audit.list", {"limit": 1000}))["entries"]
    return [r for r in rows if r["action"] == "rule.state"]


async def test_a_batch_of_connects_and_answers_syncs_everyone_and_records_each_change(
    edge: Any,
) -> None:
    fakes, ids, rules = await _fleet(edge, 3)
    for e in fakes:  # forget the first sync and the push's apply
        while not e.frames.empty():
            e.frames.get_nowait()
    before = len(await _rule_audit(edge))
    service = edge.service
    # Queued together, as a storm queues them: three connects, then answers: one
    # confirms (no write), one flips to failed, then back to active (two audit rows).
    for client_id in ids:
        service.client_connected(client_id)
    service.rules_applied(ids[0], {str(rules[0]): RuleResult("active", None)})
    service.rules_applied(ids[1], {str(rules[1]): RuleResult("failed", "port in use")})
    service.rules_applied(ids[1], {str(rules[1]): RuleResult("active", None)})
    service.rules_applied(
        ids[2], {"99999999": RuleResult("active", None), "x": RuleResult("active", None)}
    )
    await service.drain_events()
    for e, rule_id in zip(fakes, rules, strict=True):
        sync = await e.recv("sync")
        assert [r["id"] for r in sync["rules"]] == [str(rule_id)]
    got = {r["id"]: r["state"] for r in (await edge.call("rules.list"))["rules"]}
    assert got == {rule_id: "active" for rule_id in rules}
    trail = (await _rule_audit(edge))[: len(await _rule_audit(edge)) - before]
    moves = sorted((r["target"], r["details"]["from"], r["details"]["to"]) for r in trail)
    assert moves == sorted(
        [(f"rule:{rules[1]}", "active", "failed"), (f"rule:{rules[1]}", "failed", "active")]
    ), trail


async def test_a_failing_batch_falls_back_to_one_event_at_a_time(
    edge: Any, monkeypatch: Any
) -> None:
    fakes, ids, rules = await _fleet(edge, 2)
    for e in fakes:  # forget the first sync and the push's apply
        while not e.frames.empty():
            e.frames.get_nowait()
    service = edge.service

    async def broken(client_ids: list[str]) -> None:
        raise RuntimeError("batch read failed")

    monkeypatch.setattr(service, "_sync_clients", broken)
    for client_id in ids:
        service.client_connected(client_id)
    await service.drain_events()
    for e, rule_id in zip(fakes, rules, strict=True):
        sync = await e.recv("sync")
        assert [r["id"] for r in sync["rules"]] == [str(rule_id)]
