"""The frame limits against the largest legitimate frames, measured here.

If a change makes a legitimate frame larger (a new hello field, a longer token,
more capabilities, a fatter rule), these fail before a real client is cut off.
The figures are quoted in ``control.fleet.preauth`` and ``ipc.edge_wire``.
"""

from __future__ import annotations

import secrets

from portunus import __version__
from portunus.control.fleet.enrollment import MAX_SECRET_LEN
from portunus.control.fleet.gateway import _MAX_CAPABILITIES
from portunus.control.fleet.preauth import PREAUTH_MAX_FRAME
from portunus.control.store.accounts import new_ulid
from portunus.ipc.edge_wire import CAPABILITIES, MAX_FRAME, encode_frame
from portunus.rules import Rule, Target, build_rule

# The rule count 16 MiB must carry in one sync (docs/edge.md "Limits").
SYNC_CAPACITY = 50_000


def _hello(token: str, version: str, caps: list[str]) -> dict[str, object]:
    # The shape portunus.edge.link sends.
    return {
        "type": "hello",
        "token": token,
        "client_id": new_ulid(),
        "version": version,
        "capabilities": caps,
    }


def test_real_first_frames_are_far_below_the_preauth_limit() -> None:
    hello = encode_frame(_hello(secrets.token_urlsafe(32), __version__, list(CAPABILITIES)))
    enroll = encode_frame(
        {"type": "enroll", "code": secrets.token_urlsafe(24), "version": __version__}
    )
    assert len(hello) < 300 and len(enroll) < 120, (len(hello), len(enroll))
    assert len(hello) * 16 < PREAUTH_MAX_FRAME


def test_the_largest_hello_the_server_reads_fits_the_preauth_limit() -> None:
    """Every field at the most the server still looks at: token up to
    MAX_SECRET_LEN, _MAX_CAPABILITIES of 64 characters, a 64-character version."""
    caps = [f"{i:02d}" + "c" * 62 for i in range(_MAX_CAPABILITIES)]
    frame = encode_frame(_hello("t" * MAX_SECRET_LEN, "v" * 64, caps))
    enroll = encode_frame({"type": "enroll", "code": "c" * MAX_SECRET_LEN, "version": "v" * 64})
    assert len(frame) <= PREAUTH_MAX_FRAME, len(frame)
    assert len(enroll) <= PREAUTH_MAX_FRAME
    # "A few KiB": the margin is kept modest so an anonymous peer gets little.
    assert PREAUTH_MAX_FRAME <= 2 * len(frame)


def _rule(i: int, protocol: str, lo: int, hi: int) -> Rule:
    return build_rule(
        id=str(100_000 + i),
        protocol=protocol,
        listen=(lo, hi),
        client="edge-0001",
        targets=[Target("10.20.30.40", lo, port_end=hi if hi != lo else None)],
        range_max_ports=1024,
    )


def test_a_full_sync_of_the_documented_capacity_fits_max_frame() -> None:
    rules = [
        _rule(i, "tcp" if i % 2 else "udp", 1 + i // 2, 1 + i // 2) for i in range(SYNC_CAPACITY)
    ]
    frame = encode_frame({"type": "sync", "seq": 2**31, "rules": [r.to_wire() for r in rules]})
    assert len(frame) <= MAX_FRAME, len(frame)


def test_every_port_in_range_rules_syncs_and_reports_stats_within_max_frame() -> None:
    """Every TCP and UDP port held by the widest rules (range_rule_max_ports 1024):
    the sync is small, and the client's stats frame with a per_port row for
    every port (the largest frame a client sends) still fits."""
    spans = [(proto, lo) for proto in ("tcp", "udp") for lo in range(1, 65536, 1024)]
    rules = [_rule(i, proto, lo, min(lo + 1023, 65535)) for i, (proto, lo) in enumerate(spans)]
    sync = encode_frame({"type": "sync", "seq": 1, "rules": [r.to_wire() for r in rules]})
    assert len(sync) < 64 * 1024
    big = 10**12  # a TB per port and a trillion connections
    counters = {
        "bytes_in": big,
        "bytes_out": big,
        "connections_total": big,
        "active_connections": 65535,
    }
    stats = {
        "type": "stats",
        "rules": {
            r.id: {**counters, "per_port": [{"port": p, **counters} for p in r.ports]}
            for r in rules
        },
    }
    assert len(encode_frame(stats)) <= MAX_FRAME


def test_a_stats_frame_too_long_for_one_frame_keeps_its_totals() -> None:
    """Detail rows can outgrow MAX_FRAME (a per_port row for every port of wide ranges
    with large counters is ~17 MiB); the client then sends the totals alone instead of
    failing its link every stats interval."""
    from portunus.edge.link import stats_frame

    counters = {
        "bytes_in": 2**53,
        "bytes_out": 2**53,
        "connections_total": 2**40,
        "active_connections": 9,
    }
    totals = {
        str(i): {
            **counters,
            "per_port": [{"port": p, **counters} for p in range(1, 200)],
            "per_target": [{"target": "10.0.0.1:80", "connections_total": 1, "up": True}],
        }
        for i in range(50)
    }
    full = stats_frame(totals)
    assert full.rules is totals  # fits: unchanged
    slim = stats_frame(totals, max_len=64 * 1024)
    assert set(slim.rules) == set(totals)
    assert all(entry == counters for entry in slim.rules.values())
    assert len(encode_frame(slim)) <= 64 * 1024
