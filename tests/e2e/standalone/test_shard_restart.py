"""A shard killed with SIGKILL under a continuous connect loop: no connection is
refused (the supervisor still holds the listening sockets and hands the very same
ones to the replacement), only the connections in flight at the kill instant may
be reset, and the shard comes back under its title, counted in
portunus_shard_restarts_total."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

from tests.e2e.support import connect, echo, recv_exact, wait_for

LOOP_THREADS = 2


@dataclass
class LoopStats:
    ok: int = 0
    ok_after_kill: int = 0
    refused: int = 0
    resets: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def test_sigkill_shard_during_connect_loop(standalone, origin, ports) -> None:  # type: ignore[no-untyped-def]
    org = origin(echo)
    port = ports.port()
    proc = standalone([{"name": "loop", "listen_port": port, "target": org.address}], shards=2)
    victim = proc.shards()[0]
    survivor = proc.shards()[1]
    assert proc.scrape().value("portunus_shard_restarts_total") == 0

    stats = LoopStats()
    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()

    def loop(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            line = f"thread {n} line {i}\n".encode()
            try:
                with connect(port, timeout=5) as s:
                    s.sendall(line)
                    got = recv_exact(s, len(line))
                with lock:
                    if got == line:
                        stats.ok += 1
                        if killed.is_set():
                            stats.ok_after_kill += 1
                    else:
                        stats.other.append(f"mismatch {got!r}")
            except ConnectionRefusedError:
                with lock:
                    stats.refused += 1
            except (ConnectionResetError, BrokenPipeError, EOFError) as exc:
                with lock:
                    stats.resets.append(repr(exc))
            except OSError as exc:  # timeouts and anything else: must not happen
                with lock:
                    stats.other.append(repr(exc))

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(LOOP_THREADS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: stats.ok >= 200, 10, what="the connect loop to warm up")
        time.sleep(0.5)  # keep the loop running before the kill (~1 s of traffic in all)
        killed.set()
        os.kill(victim.pid, signal.SIGKILL)
        kill_at = time.monotonic()
        # The shard is back: a new process under the same title.
        new = wait_for(
            lambda: (s := proc.shards().get(0)) is not None and s.pid != victim.pid and s,
            5,
            what="shard 0 to be respawned",
        )
        respawn_secs = time.monotonic() - kill_at
        while time.monotonic() - kill_at < 2.0:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)

    print(f"loop: {stats}, respawned in {respawn_secs:.3f}s")
    assert stats.refused == 0, f"{stats.refused} connection(s) refused while the shard restarted"
    assert stats.other == [], stats.other[:5]
    assert len(stats.resets) <= LOOP_THREADS, f"{len(stats.resets)} resets: {stats.resets[:5]}"
    assert stats.ok_after_kill >= 100, f"only {stats.ok_after_kill} connections after the kill"
    assert respawn_secs < 2.0
    assert new.cmdline() and " ".join(new.cmdline()).strip() == "portunus: shard 0"
    assert proc.shards()[1].pid == survivor.pid, "the other shard was restarted too"
    wait_for(
        lambda: proc.scrape().value("portunus_shard_restarts_total", shard="0") == 1,
        5,
        what="portunus_shard_restarts_total{shard=0} == 1",
    )
    m = proc.scrape()
    assert m.value("portunus_shard_restarts_total") == 1
    rec = proc.wait_log("shard.restarted", child="shard-0")
    assert rec["pid"] == victim.pid and rec["how"] == "signal SIGKILL"
    # The replacement serves: keep connecting until both shards have answered.
    with connect(port) as s:
        s.sendall(b"after\n")
        assert recv_exact(s, 6) == b"after\n"
