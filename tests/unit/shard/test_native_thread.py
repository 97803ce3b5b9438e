"""The native relay's own thread (``Relay(threaded=True)``, _relay.c).

The thread handles every event without the GIL and tells Python through an
eventfd (``fileno()``) only when reports are due; every method called from
Python takes the relay's mutex.  These tests drive a bare ``Relay`` (no loop)
where the mechanism is the point, and a real port (native_tcp.py) for rule
removal and shutdown with connections open.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import socket
import time

import pytest

from .. import loopkit
from ..fdwait import readable
from ..loopkit import LOOPBACK, listener, new_loop

try:
    from portunus.shard._relay import Relay
except ImportError:
    pytest.skip(
        "the native relay is not built (no C compiler at install time)", allow_module_level=True
    )

from .test_native_tcp import Port, serve_once

loop = pytest.fixture(new_loop)
run_until = functools.partial(loopkit.run_until, timeout=10.0)


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client side, accepted side)."""
    lst = listener()
    c = socket.create_connection(lst.getsockname(), timeout=5)
    s, _ = lst.accept()
    lst.close()
    return c, s


def poll_until(relay: Relay, cond, timeout: float = 5.0) -> list:  # type: ignore[no-untyped-def, type-arg]
    """Wait on the eventfd, poll(), collect the connection reports until ``cond(reports)``."""
    got: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while not cond(got):
        left = deadline - time.monotonic()
        assert left > 0, f"no such reports in time: {got}"
        if readable(relay.fileno(), left):
            reports, _lreports, more = relay.poll()
            assert more is False  # the thread finishes its bursts itself
            got.extend(reports)
    return got


class Token:
    pass


def test_reports_arrive_through_the_eventfd() -> None:
    """An add()ed pair relays in the thread; its close wakes Python once, with the bytes."""
    relay = Relay(report_ms=40, threaded=True)
    assert relay.running and relay.threaded
    a, a_peer = pair()  # client <-> relay's fd 0
    b, b_peer = pair()  # relay's fd 1 <-> origin
    token = Token()
    relay.add(a_peer.detach(), b.detach(), token)
    assert not readable(relay.fileno(), 0.05)  # nothing to report: Python is not woken
    a.sendall(b"ping" * 1000)
    got = b""
    while len(got) < 4000:
        assert readable(b_peer, 5)
        got += b_peer.recv(65536)
    b_peer.sendall(b"pong")
    assert a.recv(100) == b"pong"
    assert not readable(relay.fileno(), 0.05)  # under 64 KiB and open: still nothing
    a.close()
    b_peer.close()
    reports = poll_until(relay, lambda r: any(x[3] for x in r))
    assert [x[0] for x in reports] == [token] * len(reports)
    assert sum(x[1] for x in reports) == 4000 and sum(x[2] for x in reports) == 4
    assert [x[3] for x in reports].count(1) == 1
    assert relay.live == 0
    assert not readable(relay.fileno(), 0)  # the eventfd was read by poll()
    relay.stop()
    assert not relay.running


def test_close_of_a_connection_the_thread_closed_takes_its_report() -> None:
    """Python closes a connection whose close the thread queued but poll() has not
    delivered: close() returns the bytes and poll() does not report the close again."""
    relay = Relay(threaded=True)
    a, a_peer = pair()
    b, b_peer = pair()
    h = relay.add(a_peer.detach(), b.detach(), Token())
    a.sendall(b"x" * 100)
    assert readable(b_peer, 5) and b_peer.recv(1000) == b"x" * 100
    a.close()
    b_peer.close()
    assert readable(relay.fileno(), 5)  # the thread closed it and queued the report
    assert relay.close(h) == (100, 0)
    reports, _, _ = relay.poll()
    assert reports == []
    with pytest.raises(KeyError):
        relay.close(h)  # the handle is free only now, not reused under Python's feet
    relay.stop()


def test_a_reported_close_keeps_its_handle_until_the_next_poll() -> None:
    """Python may still close(handle) while it works through the batch that reported the
    close: the handle must not name another connection by then (the thread accepts and
    adds meanwhile); it is free only from the next poll() on."""
    relay = Relay(threaded=True)
    a, a_peer = pair()
    b, b_peer = pair()
    h = relay.add(a_peer.detach(), b.detach(), Token())
    a.close()
    b_peer.close()
    assert any(x[3] for x in poll_until(relay, lambda r: any(x[3] for x in r)))
    c, c_peer = pair()
    d, d_peer = pair()
    h2 = relay.add(c_peer.detach(), d.detach(), Token())
    assert h2 != h  # not reused yet
    assert relay.close(h) == (0, 0)  # a late close from Python: harmless
    c.sendall(b"alive")
    d_peer.settimeout(5)
    assert d_peer.recv(100) == b"alive"  # the other connection was not touched
    relay.poll()
    with pytest.raises(KeyError):
        relay.close(h)
    for s in (c, d_peer):
        s.close()
    relay.close_all()
    relay.stop()


def test_stop_with_live_connections_joins_the_thread_and_leaks_no_fd() -> None:
    before = open_fds()
    relay = Relay(threaded=True)
    socks = []
    for _ in range(5):
        a, a_peer = pair()
        b, b_peer = pair()
        relay.add(a_peer.detach(), b.detach(), Token())
        socks += [a, b_peer]
    socks[0].sendall(b"in flight")
    assert relay.live == 5
    relay.close_all()
    relay.stop()
    assert not relay.running
    for s in socks[::2]:
        assert readable(s, 5)  # closed by the relay: EOF, or a reset if data was unread
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    for s in socks:
        s.close()
    del relay
    gc.collect()
    assert open_fds() <= before  # (an earlier test's leftovers may close meanwhile)


def test_relays_while_python_is_busy_and_never_polls() -> None:
    """The interpreter's only thread computes (holding the GIL, never polling): a
    child process's bytes still cross the relay, which needs neither."""
    relay = Relay(threaded=True)
    a, a_peer = pair()
    b, b_peer = pair()
    relay.add(a_peer.detach(), b.detach(), Token())
    pid = os.fork()
    if pid == 0:  # the child only uses its two sockets
        try:
            a.sendall(b"through")
            b_peer.settimeout(5)
            os._exit(0 if b_peer.recv(100) == b"through" else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 10
    status = None
    while status is None and time.monotonic() < deadline:
        sum(range(200_000))  # C code holding the GIL
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
    if status is None:
        os.waitpid(pid, 0)
    assert status == 0
    a.close()
    b_peer.close()
    relay.close_all()
    relay.stop()


def test_rule_removal_with_open_connections(loop: asyncio.AbstractEventLoop) -> None:
    """The handler stops listening; the open connection keeps relaying in the thread
    and, at its close, the listener is forgotten and its fds and handler freed."""
    origin = listener()
    p = Port(loop, [origin.getsockname()[1]])
    assert p.ctx.native.relay.running
    client = socket.create_connection(p.addr, timeout=10)
    run_until(loop, lambda: p.handler.live == 1)
    up, _ = origin.accept()
    p.handler.close()  # rule removed: stop accepting
    p.lsock.close()
    with pytest.raises(OSError):
        socket.create_connection(p.addr, timeout=2)  # nobody listens any more
    client.sendall(b"still relayed")
    up.settimeout(5)
    assert up.recv(100) == b"still relayed"
    up.sendall(b"back")
    assert client.recv(100) == b"back"
    client.close()
    up.close()
    run_until(loop, lambda: p.handler.handle is None)  # forgotten after the last close
    assert p.rt.conns == set() and p.value("active") == 0
    assert (p.value("bytes_in"), p.value("bytes_out")) == (len(b"still relayed"), 4)
    p.ctx._native.shutdown()
    assert not p.ctx.native.relay.running
    origin.close()


def test_shard_shutdown_with_live_connections(loop: asyncio.AbstractEventLoop) -> None:
    before = open_fds()
    origin = listener()
    p = Port(loop, [origin.getsockname()[1]])
    got: list[bytes] = []
    serve_once(origin, b"never sent", got)
    clients = [socket.create_connection(p.addr, timeout=10) for _ in range(3)]
    run_until(loop, lambda: p.handler.live == 3)
    relay = p.ctx.native.relay
    p.ctx._native.shutdown()  # close_all + stop: joins the thread
    assert not relay.running and relay.live == 0
    for c in clients:
        assert readable(c, 5)
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass
        c.close()
    p.handler.close()
    p.lsock.close()
    origin.close()
    gc.collect()
    # Sockets only: the stopped relay's own fds go with it whenever the loop's
    # bookkeeping lets go of the shard context (the bare test above checks those).
    leaked = [fd for fd in open_fds() - before if "socket" in os.readlink(f"/proc/self/fd/{fd}")]
    # The origin thread's accepted socket may still be open (it waits for EOF).
    assert len(leaked) <= 1, leaked


def test_udp_datagrams_queued_while_python_admits_all_arrive() -> None:
    """A new client's first datagrams wait in the thread for admit_flow(), then go out."""
    relay = Relay(threaded=True)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((LOOPBACK, 0))
    port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port.bind((LOOPBACK, 0))
    port.setblocking(False)

    class Handler:
        asked = 0

        def admit_flow(self) -> bool:
            Handler.asked += 1
            return True

    h = relay.udp_listen(
        port.fileno(), Handler(), 1, [(LOOPBACK, echo.getsockname()[1], 0)], 60.0, None
    )
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(3):
        c.sendto(b"d%d" % i, port.getsockname())
    assert readable(relay.fileno(), 5)  # the thread asks Python to admit the flow
    relay.poll()
    assert Handler.asked == 1
    echo.settimeout(5)
    assert [echo.recvfrom(100)[0] for _ in range(3)] == [b"d0", b"d1", b"d2"]
    assert len(relay.udp_flows(h)) == 1
    report = relay.udp_close(h)
    assert report[1] == 1  # the flow's close, for the cap and the metrics
    relay.stop()
    for s in (echo, port, c):
        s.close()
