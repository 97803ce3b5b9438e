"""Bytes forwarded both ways, intact, on the splice path and on the copy path.

One origin serves every case: the client's header says how many bytes to send
back (``duplex_on_request``), and both directions stream at the same time.  The
checksums compare what one end sent with what the other end received.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from tests.e2e.support import (
    KiB,
    MiB,
    Origin,
    Pattern,
    StandaloneProc,
    client_duplex,
    duplex_on_request,
    pipe_fds,
    wait_for,
)

PATHS = ("splice", "copy")
_tokens = itertools.count(1)


@dataclass
class Relay:
    proc: StandaloneProc
    port: int
    pipes_at_start: int


@pytest.fixture(scope="module")
def origin_srv(origin_module) -> Origin:  # type: ignore[no-untyped-def]
    return origin_module(duplex_on_request)


@pytest.fixture(scope="module")
def relays(standalone_module, origin_srv: Origin, ports) -> dict[str, Relay]:  # type: ignore[no-untyped-def]
    out: dict[str, Relay] = {}
    for path in PATHS:
        port = ports.port()
        proc = standalone_module(
            [{"name": "fwd", "listen_port": port, "target": origin_srv.address}],
            splice=path == "splice",
        )
        pipes = sum(pipe_fds(p.pid) for p in proc.shards().values())
        out[path] = Relay(proc, port, pipes)
    return out


def transfer(relay: Relay, origin_srv: Origin, size_in: int, size_out: int) -> None:
    token = next(_tokens)
    send = Pattern(size_in, seed=2 * token)
    reply = Pattern(size_out, seed=2 * token + 1)
    sent, received = client_duplex(relay.port, send, reply, token)
    rec = wait_for(
        lambda: next((r for r in origin_srv.records if r.extra.get("token") == token), None),
        10,
        what=f"origin record for token {token}",
    )
    assert rec.done.wait(30), "origin handler did not finish"
    assert rec.error is None, f"origin failed: {rec.error!r}"
    # client -> target
    assert sent.count == size_in
    assert rec.rx.count == size_in, f"origin got {rec.rx.count} of {size_in} bytes"
    assert rec.rx.hexdigest() == sent.hexdigest(), "client->target payload corrupted"
    # target -> client
    assert rec.tx.count == size_out
    assert received.count == size_out, f"client got {received.count} of {size_out} bytes"
    assert received.hexdigest() == rec.tx.hexdigest(), "target->client payload corrupted"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", [1, MiB, 20 * MiB], ids=["1B", "1MiB", "20MiB"])
def test_bytes_both_ways(
    relays: dict[str, Relay], origin_srv: Origin, path: str, size: int
) -> None:
    transfer(relays[path], origin_srv, size, size)


@pytest.mark.parametrize("path", PATHS)
def test_unequal_sizes_both_ways(relays: dict[str, Relay], origin_srv: Origin, path: str) -> None:
    transfer(relays[path], origin_srv, 3 * MiB + 17, 5 * KiB + 3)
    transfer(relays[path], origin_srv, 0, 2 * MiB + 1)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_200mib_streamed_both_ways(relays: dict[str, Relay], origin_srv: Origin, path: str) -> None:
    transfer(relays[path], origin_srv, 200 * MiB, 200 * MiB)


def test_relay_path_follows_no_splice_env(relays: dict[str, Relay], origin_srv: Origin) -> None:
    """The splice path moves bytes through pipes (kept in the shard's pool);
    PORTUNUS_NO_SPLICE=1 must really switch to the userspace copy (no pipes)."""
    for relay in relays.values():
        transfer(relay, origin_srv, 256 * KiB, 256 * KiB)
    splice, copy = relays["splice"], relays["copy"]
    splice_pipes = sum(pipe_fds(p.pid) for p in splice.proc.shards().values())
    copy_pipes = sum(pipe_fds(p.pid) for p in copy.proc.shards().values())
    assert splice_pipes >= splice.pipes_at_start + 2, "splice path allocated no pipe"
    assert copy_pipes == copy.pipes_at_start, "copy path allocated pipes: is it splicing?"
