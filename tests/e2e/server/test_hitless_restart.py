"""A restart of ``serve`` refuses no connection when systemd keeps the listeners
(FileDescriptorStoreMax= + PORTUNUS_FDSTORE=1): the supervisor stores every
listening socket in the fd store, systemd hands them to the next process
(sd_listen_fds), and connections that arrive while the old process drains and the
new one starts wait in the kernel's queue of the very same socket.

``FakeSystemd`` plays systemd's part on loopback: it receives the ``FDSTORE=1``
datagrams with their fds (SCM_RIGHTS), honours ``FDSTOREREMOVE=1``, and starts the
next process with the stored fds as 3, 4, ... and ``LISTEN_FDS``/``LISTEN_FDNAMES``/
``LISTEN_PID`` set, as systemd does on ``systemctl restart``.  The booted-Debian
packaging tests cannot run everywhere; this proves the mechanism in every CI run.
"""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.e2e.support import ServerProc, connect, echo, recv_exact, wait_for


class FakeSystemd:
    """$NOTIFY_SOCKET with an fd store."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ptn-sd-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.store: dict[str, list[int]] = {}  # FDNAME -> fds, as systemd keeps them
        self.messages: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_forever, daemon=True)
        self._reader.start()

    def _read_forever(self) -> None:
        # systemd reads its notify socket at once; so must we (a unix datagram
        # queue holds only a few messages).
        while not self._stop.is_set():
            self.poll()
            time.sleep(0.002)

    def poll(self) -> None:
        with self.lock:
            self._poll()

    def _poll(self) -> None:
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except (BlockingIOError, OSError):
                return
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)
            name = msg.get("FDNAME", "")
            if msg.get("FDSTORE") == "1" and fds:
                self.store.setdefault(name, []).extend(fds)
            elif msg.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(name, []):
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def start(self, srv: ServerProc) -> None:
        """Start ``srv`` with the stored fds, the way systemd restarts a unit."""
        self.poll()
        with self.lock:
            names = [n for n, fds_of in self.store.items() for _ in fds_of]
            fds = [os.dup(fd) for fds_of in self.store.values() for fd in fds_of]
        env = {**srv.env, "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join(names)}
        argv = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *srv.argv]

        def place_fds() -> None:
            # Out of the way of 3..n first (plain dup() may land right there).
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)  # dup2 clears FD_CLOEXEC on the target
            for fd in high:
                os.close(fd)

        srv.start_mark = srv.log_mark()
        with open(srv.stderr_path, "ab") as err, open(srv.stdout_path, "ab") as out:
            srv.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=srv.workdir,
                start_new_session=True,
                preexec_fn=place_fds,
                pass_fds=tuple(range(3, 3 + len(fds))),
            )
        for fd in fds:
            os.close(fd)
        srv.known_pids.add(srv.proc.pid)

    def close(self) -> None:
        self._stop.set()
        self._reader.join(2)
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    yield fake
    fake.close()


@dataclass
class Loop:
    ok: int = 0
    refused: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def _connect_loop(port: int, stats: Loop, stop: threading.Event, lock: threading.Lock) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        line = f"line {i}\n".encode()
        try:
            with connect(port, timeout=30) as s:
                s.sendall(line)
                got = recv_exact(s, len(line))
            with lock:
                if got == line:
                    stats.ok += 1
                else:
                    stats.other.append(f"mismatch {got!r}")
        except ConnectionRefusedError as exc:
            with lock:
                stats.refused.append(repr(exc))
        except OSError as exc:
            with lock:
                stats.other.append(repr(exc))


@pytest.mark.parametrize("fdstore", [True, False], ids=["fdstore", "control-without-store"])
def test_restart_with_the_fd_store_refuses_nothing(
    server,
    origin,
    ports,
    systemd: FakeSystemd,  # type: ignore[no-untyped-def]
    fdstore: bool,
) -> None:
    """With the store no connection is refused; the control run without it shows the
    same loop does see refusals across a plain restart (so the test can fail)."""
    env = {"NOTIFY_SOCKET": systemd.path, "PORTUNUS_FDSTORE": "1"} if fdstore else {}
    srv: ServerProc = server(shards=2, env=env)
    org = origin(echo)
    port, gone_port = ports.ports(2)
    rid = srv.cli_json("push-rule", "local", str(port), org.address)["id"]
    gone = srv.cli_json("push-rule", "local", str(gone_port), org.address)["id"]
    srv.remove_rule(gone)
    systemd.poll()
    if fdstore:
        assert {
            f"tcp/{port}",
            "own.operator_http_listen",
            "own.metrics_listen",
            "own.control_listen",
        } <= set(systemd.store), systemd.store
        assert len(systemd.store[f"tcp/{port}"]) == 2  # one per shard
        assert f"tcp/{gone_port}" not in systemd.store, "a removed rule's sockets stayed stored"
    else:
        assert systemd.store == {}

    stats, stop, lock = Loop(), threading.Event(), threading.Lock()
    threads = [
        threading.Thread(target=_connect_loop, args=(port, stats, stop, lock), daemon=True)
        for _ in range(3)
    ]
    long_lived = connect(port)
    for t in threads:
        t.start()
    try:
        wait_for(lambda: stats.ok >= 100, 10, what="the connect loop to warm up")
        long_lived.sendall(b"before\n")
        assert recv_exact(long_lived, 7) == b"before\n"
        old_pid = srv.pid
        srv.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the old process drains; new connections queue meanwhile
        long_lived.sendall(b"drain\n")  # the open connection finishes its work
        assert recv_exact(long_lived, 6) == b"drain\n"
        long_lived.close()
        assert srv.wait_exit(30) == 0, srv.stderr_tail()
        before_restart = stats.ok
        if fdstore:
            systemd.start(srv)
        else:
            srv.start()
        srv.wait_ready()
        assert srv.pid != old_pid
        wait_for(
            lambda: stats.ok >= before_restart + 100, 15, what="connections through the new process"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(35)
    if not fdstore:
        assert stats.refused, "a plain restart refused nothing: the loop cannot tell"
        return
    assert stats.refused == [], f"{len(stats.refused)} connection(s) refused across the restart"
    assert stats.other == [], stats.other[:5]
    assert srv.events("fdstore.inherited", since=srv.start_mark)
    assert srv.rules()[rid]["state"] == "active"
    # The API and metrics listeners were kept as well.
    assert (
        srv.health_ok() and srv.scrape().value("portunus_rule_connections_total", rule=str(rid)) > 0
    )
    # The new process stored what it adopted again, once per port: a second restart
    # would be just as hitless.
    systemd.poll()
    assert len(systemd.store[f"tcp/{port}"]) == 2, systemd.store


def test_udp_port_is_never_unreachable_across_a_restart(
    server, ports, systemd: FakeSystemd
) -> None:  # type: ignore[no-untyped-def]
    """A UDP rule: datagrams sent while the old process stops and the new one starts
    wait in the kept socket; no ICMP port-unreachable (ECONNREFUSED) comes back."""
    echo_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo_sock.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def udp_echo() -> None:
        echo_sock.settimeout(0.1)
        while not stop.is_set():
            try:
                data, addr = echo_sock.recvfrom(2048)
                echo_sock.sendto(data, addr)
            except (TimeoutError, OSError):
                continue

    threading.Thread(target=udp_echo, daemon=True).start()
    srv: ServerProc = server(shards=2, env={"NOTIFY_SOCKET": systemd.path, "PORTUNUS_FDSTORE": "1"})
    port = ports.port()
    srv.cli_json(
        "push-rule",
        "local",
        str(port),
        f"127.0.0.1:{echo_sock.getsockname()[1]}",
        "--protocol",
        "udp",
    )
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect(("127.0.0.1", port))
    client.settimeout(0.05)
    refused: list[str] = []
    answers = 0
    restarted = threading.Event()

    def restart() -> None:
        srv.send_signal(signal.SIGTERM)
        assert srv.wait_exit(30) == 0
        systemd.start(srv)
        srv.wait_ready()
        restarted.set()

    try:
        t = threading.Thread(target=restart, daemon=True)
        t.start()
        deadline = time.monotonic() + 40
        after = 0
        i = 0
        while time.monotonic() < deadline and after < 50:
            i += 1
            try:
                client.send(f"d{i}".encode())
                client.recv(64)
                answers += 1
                if restarted.is_set():
                    after += 1
            except ConnectionRefusedError as exc:
                refused.append(repr(exc))
            except TimeoutError:
                pass
        t.join(30)
    finally:
        stop.set()
        client.close()
        echo_sock.close()
    assert restarted.is_set(), srv.stderr_tail()
    assert refused == [], f"{len(refused)} ICMP port-unreachable across the restart"
    assert after >= 50, f"only {after} answers after the restart"
