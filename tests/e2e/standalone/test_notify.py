"""sd_notify spoken to a fake $NOTIFY_SOCKET: READY=1 (with STATUS= and MAINPID=)
once the rules are bound, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on
SIGTERM, and WATCHDOG=1 pings when WATCHDOG_USEC is set."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.e2e.support import FakeNotify, echo, listening_ports, wait_for


@pytest.fixture
def systemd() -> Iterator[FakeNotify]:
    """The fake systemd the process under test notifies."""
    fake = FakeNotify()
    yield fake
    fake.close()


def test_ready_reloading_and_stopping(standalone, origin, ports, systemd: FakeNotify) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    proc = standalone(
        [{"name": "n", "listen_port": port, "target": org.address}],
        env={"NOTIFY_SOCKET": systemd.path},
        ready=False,
    )
    ready = systemd.wait("READY")
    assert port in listening_ports(), "READY=1 was sent before the rule's port was bound"
    assert ready["STATUS"] == "forwarding 1 rule(s) on 1 shard(s)"
    assert ready["MAINPID"] == str(proc.pid)
    assert sum(1 for m in systemd.messages if m.get("READY") == "1") == 1
    proc.wait_ready()

    mark = len(systemd.poll())
    proc.reload()
    systemd.wait("RELOADING", since=mark)
    systemd.wait("READY", since=mark)
    after = systemd.messages[mark:]
    reloading_at = next(i for i, m in enumerate(after) if m.get("RELOADING") == "1")
    assert any(m.get("READY") == "1" for m in after[reloading_at + 1 :]), (
        f"READY=1 must follow RELOADING=1: {after}"
    )

    mark = len(systemd.poll())
    proc.send_signal(signal.SIGTERM)
    systemd.wait("STOPPING", since=mark)
    assert proc.wait_exit(10) == 0
    assert not any(m.get("WATCHDOG") for m in systemd.poll()), (
        "watchdog pings without WATCHDOG_USEC"
    )


def _watchdog_run(standalone, origin, ports, systemd: FakeNotify, pings: int) -> list[float]:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    proc = standalone(
        [{"name": "w", "listen_port": port, "target": org.address}],
        env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "1000000"},
    )
    wait_for(
        lambda: sum(1 for m in systemd.poll() if m.get("WATCHDOG") == "1") >= pings,
        pings + 1.0,
        what=f"{pings} WATCHDOG=1 pings",
    )
    assert any(m.get("READY") == "1" for m in systemd.messages)
    assert proc.alive()
    return [
        t
        for m, t in zip(systemd.messages, systemd.received_at, strict=True)
        if m.get("WATCHDOG") == "1"
    ]


def test_watchdog_pings(standalone, origin, ports, systemd: FakeNotify) -> None:  # type: ignore[no-untyped-def]
    """WATCHDOG_USEC=1000000: pings keep arriving (3 within ~4 s)."""
    _watchdog_run(standalone, origin, ports, systemd, 3)


def test_watchdog_pings_at_half_the_deadline(
    standalone, origin, ports, systemd: FakeNotify
) -> None:  # type: ignore[no-untyped-def]
    pings = _watchdog_run(standalone, origin, ports, systemd, 4)
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 0.75, (
        f"watchdog pings {[round(g, 3) for g in gaps]} s apart; want ~0.5 s (deadline 1 s)"
    )
