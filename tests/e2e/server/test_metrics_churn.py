"""Rule churn on a running server: removed rules' series leave /metrics once the
processes compact their multiprocess files, while a rule that stays keeps exact,
never-decreasing counters through every rewrite (portunus/metrics/store.py)."""

from __future__ import annotations

from tests.e2e.support import LOOPBACK, echo, echo_roundtrip, wait_for

CHURNED = 80  # x 4 counters per rule in the shard, x 5 states in control: past 256


def test_churned_rules_leave_metrics_and_a_kept_rule_counts_on(server, origin, ports) -> None:  # type: ignore[no-untyped-def]
    srv = server(shards=1)
    org = origin(echo)
    kept_port, churn_port = ports.port(), ports.port()
    kept = str(srv.cli_json("push-rule", "local", str(kept_port), org.address)["id"])
    sent = 0
    seen: list[float] = []
    removed: list[str] = []
    for i in range(CHURNED):
        rid = srv.rpc(
            "rules.push",
            {"listen_port": churn_port, "targets": [{"host": LOOPBACK, "port": org.port}]},
        )["id"]
        srv.rpc("rules.remove", {"id": rid})
        removed.append(str(rid))
        if i % 8 == 0:
            assert echo_roundtrip(kept_port, b"k" * 1000)
            sent += 1000
            seen.append(srv.scrape().value("portunus_rule_bytes_in_total", rule=kept))
    assert seen == sorted(seen), f"the kept rule's counter went backwards: {seen}"

    def gone(name: str, rules: list[str]) -> bool:
        scraped = srv.scrape()
        return not any(scraped.has(name, rule=r) for r in rules)

    # Compaction runs once 256 dead series piled up in a file: by now the shard's
    # counters of the first 60 removed rules, and control's state rows of the
    # first 48, have been rewritten away.
    wait_for(
        lambda: gone("portunus_rule_connections_total", removed[:60]),
        15,
        what="removed rules' counters gone from /metrics",
    )
    wait_for(
        lambda: gone("portunus_rule_state", removed[:48]),
        15,
        what="removed rules' state rows gone from /metrics",
    )
    wait_for(
        lambda: srv.scrape().value("portunus_rule_bytes_in_total", rule=kept) == sent,
        10,
        what=f"the kept rule's bytes_in == {sent}",
    )
    assert srv.scrape().value("portunus_rule_state", rule=kept, state="active") == 1
