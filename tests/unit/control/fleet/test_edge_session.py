"""EdgeSession as its link's protocol: frames cut out of ``data_received``, the end
reported once with why (control.fleet.session)."""

from __future__ import annotations

import asyncio
from typing import Any

from portunus.control.fleet.session import EdgeSession
from portunus.ipc import edge_messages as em
from portunus.ipc.edge_wire import MAX_FRAME, encode_frame


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.written: list[bytes] = []
        self.closed = self.aborted = False
        self.resumed = 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def resume_reading(self) -> None:
        self.resumed += 1


def make() -> tuple[EdgeSession, FakeTransport, list[em.Frame], list[str]]:
    t = FakeTransport()
    frames: list[em.Frame] = []
    ends: list[str] = []
    s = EdgeSession(
        "c1",
        "edge-01",
        t,
        remote_addr="127.0.0.1:1",
        version="1",
        capabilities=[],
        connected_since="now",
        on_frame=lambda _s, m: frames.append(m),
        on_end=lambda _s, why: ends.append(why),
    )
    return s, t, frames, ends


async def test_frames_split_anywhere_and_batched_arrive_in_order() -> None:
    s, t, frames, _ = make()
    ping = encode_frame(em.Ping())
    removed = encode_frame({"type": "removed", "ids": ["1", "2"]})
    s.start(ping[:3])  # bytes the pre-auth reader read past the hello
    assert t.protocol is s and t.resumed == 1 and frames == []
    for i in range(3, len(ping)):
        s.data_received(ping[i : i + 1])
    assert [em.kind(f) for f in frames] == ["ping"]
    s.data_received(removed + ping + removed[:5])
    s.data_received(removed[5:])
    assert [em.kind(f) for f in frames] == ["ping", "removed", "ping", "removed"]
    assert isinstance(frames[1], em.Removed) and frames[1].ids == ["1", "2"]
    assert s._buf is None  # an idle link keeps no buffer


async def test_an_oversized_length_prefix_cuts_the_link_before_the_body() -> None:
    s, t, frames, ends = make()
    s.data_received((MAX_FRAME + 1).to_bytes(4, "big") + b"{")
    assert t.aborted and frames == [] and s.closing
    s.data_received(encode_frame(em.Ping()))  # nothing more is read
    assert frames == []
    s.connection_lost(None)
    assert ends == [f"bad frame: frame of {MAX_FRAME + 1} bytes exceeds {MAX_FRAME}"]


async def test_garbage_and_a_frame_that_does_not_fit_its_kind_are_bad_frames() -> None:
    s, t, _, ends = make()
    s.data_received(len(b"not json").to_bytes(4, "big") + b"not json")
    s.connection_lost(None)
    assert t.aborted and ends[0].startswith("bad frame: frame is not JSON")
    s, t, _, ends = make()
    s.data_received(encode_frame({"type": "removed", "ids": "x"}))
    s.connection_lost(None)
    assert t.aborted and ends[0].startswith("bad frame: ")


async def test_why_the_link_ended() -> None:
    s, _, _, ends = make()
    s.connection_lost(None)
    assert ends == ["the client closed the link"] and s.closing
    s, _, _, ends = make()
    s.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert ends == ["connection error: [Errno 104] Connection reset by peer"]
    s, t, _, ends = make()
    s.close(em.Error(code="revoked", message="gone"), "revoked")
    assert t.closed and b'"revoked"' in t.written[-1]
    s.send(em.Ping())  # closing: dropped
    assert len(t.written) == 1
    s.connection_lost(None)
    assert ends == ["revoked"]


async def test_sweep_pings_a_quiet_link_and_drops_a_dead_one() -> None:
    s, t, _, _ = make()
    now = asyncio.get_running_loop().time()
    s.sweep(now + s.ping_secs)
    assert t.written == [encode_frame(em.Ping())]
    s.sweep(now + s.dead_after_secs + 1)
    assert t.aborted and s.close_reason is not None and "dead link" in s.close_reason


async def test_frames_sent_right_behind_the_hello_reach_the_session(edge: Any, poll: Any) -> None:
    """The pre-auth reader may have read past the hello; the session gets those bytes."""
    _, enrolled = await edge.enroll("edge-01")
    e = edge.fake()
    await e.connect()
    hello = {
        "type": "hello",
        "token": enrolled["token"],
        "client_id": enrolled["client_id"],
        "version": "0.1.0",
        "capabilities": ["tcp", "quiet_link"],
    }
    stats = {"type": "stats", "rules": {}, "run": "run-1"}
    assert e.writer is not None
    e.writer.write(encode_frame(hello) + encode_frame(stats) + encode_frame(em.Ping())[:3])
    assert (await e.recv("welcome"))["client_id"] == enrolled["client_id"]

    async def got_stats() -> bool:
        return edge.link.runs.get(enrolled["client_id"]) == "run-1"

    await poll(got_stats)
    session = edge.link.sessions[enrolled["client_id"]]
    assert session._buf == encode_frame(em.Ping())[:3]  # a frame's start waits for the rest
    e.writer.write(encode_frame(em.Ping())[3:])

    async def whole() -> bool:
        return session._buf is None

    await poll(whole)
    assert edge.link.connected(enrolled["client_id"])
