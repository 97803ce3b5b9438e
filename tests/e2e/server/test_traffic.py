"""Traffic history end to end: bytes through a forwarded port show up in
``GET /v1/traffic`` (per rule, per client, summed), in the summary's top rules and
throughput now, and survive a restart of ``serve`` without a spike (the first
reading after the restart is only a baseline)."""

from __future__ import annotations

import socket
from typing import Any

from tests.e2e.support import LOOPBACK, ServerProc, echo, wait_for

CHUNK = b"t" * 65536


def _send(port: int, rounds: int) -> int:
    """Echo ``rounds`` chunks through the rule; returns the bytes sent one way."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        for _ in range(rounds):
            s.sendall(CHUNK)
            got = 0
            while got < len(CHUNK):
                got += len(s.recv(65536))
    return rounds * len(CHUNK)


def _total(srv: ServerProc, query: str) -> dict[str, int]:
    answer = srv.http("GET", f"/v1/traffic?{query}")
    assert answer.status == 200, answer
    series = answer.json()["series"]
    return {k: sum(p[k] for p in series) for k in ("bytes_in", "bytes_out", "connections")}


def test_traffic_history_records_forwarded_bytes(server: Any, origin: Any, ports: Any) -> None:
    srv: ServerProc = server(shards=1, settings={"traffic_sample_interval_secs": 0.5})
    org = origin(echo)
    listen = ports.port()
    rule = srv.http(
        "POST",
        "/v1/rules",
        {"listen_port": listen, "targets": [{"host": LOOPBACK, "port": org.port}]},
    )
    assert rule.status == 201, rule
    rid = rule.json()["id"]
    wait_for(lambda: srv.http("GET", "/v1/traffic/summary").status == 200, 10)
    sent = _send(listen, 40)  # 2.5 MiB each way
    wait_for(
        lambda: _total(srv, f"rule={rid}")["bytes_in"] >= sent, 15, what="the bytes in the history"
    )
    got = _total(srv, f"rule={rid}")
    # exactly what moved: the counters at the first sample were the baseline (0 here)
    assert got["bytes_in"] == sent and got["bytes_out"] == sent and got["connections"] == 1
    assert _total(srv, "client=local") == got
    top = srv.http("GET", "/v1/traffic/summary?since=1h").json()["top_rules"]
    assert top[0]["rule"] == rid and top[0]["bytes_in"] == sent

    # a restart of serve keeps the history and adds no spike: counters restart from zero
    # in fresh shards, and control's first reading is a baseline
    srv.restart()
    sent2 = _send(listen, 8)
    wait_for(
        lambda: _total(srv, f"rule={rid}")["bytes_in"] >= sent + sent2,
        15,
        what="bytes after restart",
    )
    after = _total(srv, f"rule={rid}")
    assert after["bytes_in"] == sent + sent2 and after["bytes_out"] == sent + sent2

    hourly = srv.http("GET", f"/v1/traffic?rule={rid}&resolution=hour&from=2h").json()
    assert (
        hourly["resolution"] == "hour"
        and sum(p["bytes_in"] for p in hourly["series"]) == sent + sent2
    )
    bad = srv.http("GET", "/v1/traffic?from=yesterday-ish")
    assert bad.status == 400 and bad.error_code == "validation.from"
