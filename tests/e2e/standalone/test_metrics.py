"""/metrics byte counters equal the bytes that moved: within 64 KiB while a
connection is open (flushed every 64 KiB), exact after close, summed over shards;
bytes_in = client -> target, bytes_out = target -> client."""

from __future__ import annotations

import itertools
import threading

import pytest

from tests.e2e.support import (
    REQUEST,
    KiB,
    MiB,
    Pattern,
    client_duplex,
    connect,
    duplex_on_request,
    exchange,
    multiproc_value,
    recv_all,
    send_pattern,
    wait_for,
)

FLUSH = 64 * KiB
IN = "portunus_rule_bytes_in_total"
OUT = "portunus_rule_bytes_out_total"


@pytest.mark.parametrize("path", ["splice", "copy"])
def test_counters_while_open_and_exact_after_close(standalone, origin, ports, path: str) -> None:  # type: ignore[no-untyped-def]
    n_in, reply = MiB, Pattern(700 * KiB + 5, seed=3)
    org = origin(exchange(n_in, reply))
    port = ports.port()
    proc = standalone(
        [{"name": "m", "listen_port": port, "target": org.address}], splice=path == "splice"
    )
    with connect(port) as s:
        send_pattern(s, Pattern(n_in, seed=4))
        got = recv_all(s, limit=reply.size)
        assert got.count == reply.size
        rec = org.wait_connections(1)[0]
        wait_for(lambda: rec.rx.count == n_in, 5, what="the origin to receive 1 MiB")
        # Open connection: counters lag by less than one flush unit, never lead.
        m = wait_for(
            lambda: (
                (x := proc.scrape()).value(IN, rule="m") >= n_in - FLUSH
                and x.value(OUT, rule="m") >= reply.size - FLUSH
                and x
            ),
            5,
            what="byte counters within 64 KiB while the connection is open",
        )
        assert m.value(IN, rule="m") <= n_in
        assert m.value(OUT, rule="m") <= reply.size
        assert m.value("portunus_rule_active_connections", rule="m") == 1
        assert m.value("portunus_rule_connections_total", rule="m") == 1
    assert rec.done.wait(5)
    m = wait_for(
        lambda: (x := proc.scrape()).value("portunus_rule_active_connections", rule="m") == 0 and x,
        5,
        what="the connection to be closed in the metrics",
    )
    assert m.value(IN, rule="m", client="local", owner="") == n_in
    assert m.value(OUT, rule="m", client="local", owner="") == reply.size
    assert m.value("portunus_rule_connections_total", rule="m") == 1


def test_counters_summed_across_shards(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(duplex_on_request)
    port = ports.port()
    proc = standalone([{"name": "many", "listen_port": port, "target": org.address}], shards=2)
    conns = 60
    sizes = [(1000 + i * 7919, 500 + i * 3571) for i in range(conns)]
    todo = iter(enumerate(sizes))
    lock = threading.Lock()
    failures: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            i, (n_in, n_out) = item
            try:
                sent, got = client_duplex(
                    port, Pattern(n_in, seed=i), Pattern(n_out, seed=1000 + i), i
                )
                if sent.count != n_in or got.count != n_out:
                    failures.append(f"conn {i}: {sent.count}/{n_in} in, {got.count}/{n_out} out")
            except OSError as exc:
                failures.append(f"conn {i}: {exc!r}")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    want_in = sum(n for n, _ in sizes) + conns * REQUEST.size  # the request header is payload too
    want_out = sum(n for _, n in sizes)
    m = wait_for(
        lambda: (
            (x := proc.scrape()).value("portunus_rule_active_connections", rule="many") == 0
            and x.value("portunus_rule_connections_total", rule="many") == conns
            and x
        ),
        10,
        what="all connections closed in the metrics",
    )
    assert m.value(IN, rule="many") == want_in
    assert m.value(OUT, rule="many") == want_out
    # Both shards served some of them, so the scrape really is a sum over shards.
    per_shard = {
        idx: multiproc_value(proc.metrics_dir / f"counter_{p.pid}.db", IN, rule="many")
        for idx, p in proc.shards().items()
    }
    assert all(v > 0 for v in per_shard.values()), per_shard
    assert sum(per_shard.values()) == want_in


def test_directions_are_not_swapped(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    """Very different sizes each way on several rules: each counter must match its
    own direction and rule exactly."""
    org = origin(duplex_on_request)
    p1, p2 = ports.ports(2)
    proc = standalone(
        [
            {"name": "up", "listen_port": p1, "target": org.address},
            {"name": "down", "listen_port": p2, "target": org.address},
        ]
    )
    tokens = itertools.count(1)
    client_duplex(p1, Pattern(2 * MiB, seed=1), Pattern(10, seed=2), next(tokens))
    client_duplex(p2, Pattern(10, seed=3), Pattern(3 * MiB, seed=4), next(tokens))
    m = wait_for(
        lambda: (
            (x := proc.scrape()).value("portunus_rule_active_connections") == 0
            and x.value(OUT, rule="down") == 3 * MiB
            and x
        ),
        5,
        what="counters to settle",
    )
    assert m.value(IN, rule="up") == 2 * MiB + REQUEST.size
    assert m.value(OUT, rule="up") == 10
    assert m.value(IN, rule="down") == 10 + REQUEST.size
    assert m.value(OUT, rule="down") == 3 * MiB
