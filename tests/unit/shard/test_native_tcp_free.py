"""A removed rule served by the native relay is freed by reference counting alone:
once its last connection closed, nothing (no cycle between the handler and its
``NativeConns``) keeps its runtime alive until a full GC pass."""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
import weakref
from collections.abc import Iterator

import pytest

from portunus.rules import Target, build_rule
from portunus.shard.native_tcp import NativeTcpHandler, eligible
from portunus.shard.runtime import RuleRuntime, ShardContext

from .. import loopkit
from ..fdwait import readable
from ..loopkit import LOOPBACK, listener, new_loop

try:
    from portunus.shard import _relay  # noqa: F401
except ImportError:
    pytest.skip(
        "the native relay is not built (no C compiler at install time)", allow_module_level=True
    )

loop = pytest.fixture(new_loop)
run_until = functools.partial(loopkit.run_until, timeout=10.0)


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees objects while the test runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _start(
    ctx: ShardContext, origin: socket.socket, lsock: socket.socket, backups: int
) -> tuple[RuleRuntime, NativeTcpHandler]:
    port = origin.getsockname()[1]
    rule = build_rule(
        id="freed",
        protocol="tcp",
        listen=(1, 1),
        targets=[Target(host=LOOPBACK, port=port, priority=i + 1) for i in range(1 + backups)],
    )
    rt = RuleRuntime(ctx, rule)
    assert eligible(ctx, rt)
    handler = NativeTcpHandler(ctx, rt, 0, lsock)
    handler.start()
    return rt, handler


@pytest.mark.parametrize("backups", [0, 1], ids=["one-target", "with-a-backup"])
def test_a_removed_rules_runtime_is_freed_once_its_connections_closed(
    loop: asyncio.AbstractEventLoop, no_gc: None, backups: int
) -> None:
    """With a backup target the runtime also has a TargetSet (health, failover)."""
    origin, lsock = listener(), listener()
    lsock.setblocking(False)
    ctx = ShardContext(loop, {"use_splice": True, "connect_timeout_secs": 5.0})
    drained: list[str] = []
    ctx.on_drained = lambda rt: drained.append(rt.rule.id)
    rt, handler = _start(ctx, origin, lsock, backups)
    client = socket.create_connection(lsock.getsockname(), timeout=10)
    run_until(loop, lambda h=handler: h.live == 1)
    up, _ = origin.accept()
    # The rule is removed (Shard.remove_rule, Shard.rebuild): it drains, its handler
    # stops accepting, and the shard keeps neither.
    rt.draining = True
    rt.stop()
    handler.close()
    rt_ref, handler_ref = weakref.ref(rt), weakref.ref(handler)
    del rt, handler
    assert rt_ref() is not None, "its open connection still needs it"
    client.sendall(b"after removal")
    run_until(loop, lambda: readable(up))
    assert up.recv(100) == b"after removal"
    client.close()
    up.close()
    run_until(loop, lambda: drained == ["freed"])
    run_until(loop, lambda: handler_ref() is None)
    assert rt_ref() is None, "the runtime outlived its last connection (a reference cycle?)"
    assert loop.errors == []  # type: ignore[attr-defined]
    ctx.native.shutdown()
    lsock.close()
    origin.close()
