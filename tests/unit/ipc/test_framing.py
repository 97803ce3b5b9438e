"""The supervisor channel: typed messages and fds cross a socketpair intact, and a
frame that is not a valid message is a ProtocolError that says what is wrong."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from portunus.ipc import messages as m
from portunus.ipc.framing import MAX_FRAME, Channel, ProtocolError, encode
from portunus.ipc.messages import as_dict, from_dict

RULE = {"id": "7", "protocol": "tcp", "listen_start": 8080, "listen_end": 8080}
EVERY_KIND: list[m.Message] = [
    m.Up(),
    m.Hello(version=m.PROTOCOL_VERSION, shards=2),
    m.Applied(seq=3, results={"7": m.RuleOutcome(state="failed", reason="port_in_use")}),
    m.Retried(results={"7": m.RuleOutcome(state="active")}),
    m.Removed(ids=["7"]),
    m.Settings(settings={"log_level": "debug"}),
    m.Apply(seq=4, upsert=[RULE], remove=["8"]),
    m.Sync(seq=5, rules=[RULE]),
    m.OwnerCaps(caps={"alice": {"bytes_per_sec": 1000}}),
    m.Config(settings={"connect_timeout_secs": 5.0}),
    m.Listeners(remove=["tcp/8080"]),
    m.Rules(upsert=[RULE], remove=[]),
    m.Ready(),
    m.Heartbeat(),
    m.Drained(ids=["7"]),
]


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ca, cb = Channel(a), Channel(b)
    yield ca, cb
    ca.close()
    cb.close()


def test_every_kind_crosses_as_its_class(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    for msg in EVERY_KIND:
        ours.send(msg)
    got = [msg for msg, fds in theirs.read() if not fds]
    assert got == EVERY_KIND


def test_listening_fds_travel_with_their_frame(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        ours.send(m.Heartbeat())
        ours.send(m.Listeners(add=["tcp/1", "tcp/2"]), [r1, r2])
        ours.send(m.Heartbeat())
        frames: list[tuple[m.Message, list[int]]] = []
        for _ in range(10):  # the kernel ends a read where fds are attached
            frames += theirs.read()
        (beat, none), (listeners, fds), (beat2, none2) = frames
        assert isinstance(listeners, m.Listeners) and listeners.add == ["tcp/1", "tcp/2"]
        assert len(fds) == 2 and none == none2 == [] and beat == beat2 == m.Heartbeat()
        os.write(w1, b"x")
        os.write(w2, b"y")
        assert [os.read(fds[0], 1), os.read(fds[1], 1)] == [b"x", b"y"]
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_frame_split_across_reads_is_assembled(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    data = encode(m.Sync(seq=1, rules=[RULE] * 50))
    ours.sock.sendall(data[:3])
    assert theirs.read() == []
    ours.sock.sendall(data[3:100])
    assert theirs.read() == []
    ours.sock.sendall(data[100:])
    [(msg, _)] = theirs.read()
    assert isinstance(msg, m.Sync) and msg.rules == [RULE] * 50


def _raw(body: bytes, nfds: int = 0) -> bytes:
    return struct.pack(">IH", len(body), nfds) + body


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"type": "apply", "seq": "1", "upsert": [], "remove": []}', "$.seq"),
        (b'{"type": "apply", "seq": 1, "upsert": []}', "remove"),
        (b'{"type": "stop"}', "stop"),
        (b'{"type": "applied", "seq": 1, "results": {"7": {"state": "bound"}}}', "state"),
        (b'{"seq": 1}', "type"),
        (b"[1, 2]", "object"),
        (b"not json", "JSON"),
    ],
)
def test_a_malformed_frame_is_a_protocol_error_naming_the_fault(
    pair: tuple[Channel, Channel], body: bytes, why: str
) -> None:
    ours, theirs = pair
    ours.sock.sendall(_raw(body))
    with pytest.raises(ProtocolError, match="not a valid message") as err:
        theirs.read()
    assert why in str(err.value)


def test_more_fds_announced_than_received_is_a_protocol_error(
    pair: tuple[Channel, Channel],
) -> None:
    ours, theirs = pair
    ours.sock.sendall(_raw(b'{"type": "listeners", "add": ["tcp/1"]}', nfds=1))
    with pytest.raises(ProtocolError, match="announces 1 fds, 0 received"):
        theirs.read()


def test_an_oversized_length_is_refused_before_the_body(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    ours.sock.sendall(struct.pack(">IH", MAX_FRAME + 1, 0))
    with pytest.raises(ProtocolError, match="exceeds"):
        theirs.read()


def test_eof_after_the_last_frame(pair: tuple[Channel, Channel]) -> None:
    ours, theirs = pair
    ours.send(m.Up())
    ours.sock.shutdown(socket.SHUT_WR)
    [(msg, _)] = theirs.read()
    assert msg == m.Up()
    with pytest.raises(EOFError):
        theirs.read()


@pytest.mark.parametrize("msg", EVERY_KIND, ids=lambda msg: type(msg).__name__)
def test_the_wire_form_round_trips(msg: m.Message) -> None:
    wire = as_dict(msg)
    assert wire["type"] == m.tag(type(msg))
    assert from_dict(wire) == msg
