"""The three process trees (portunus/process_trees.py): what each command forks, and
the boundary they keep: the supervisor is handed its children, it imports none."""

from __future__ import annotations

import ast
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from portunus.config import Settings
from portunus.process_trees import CLIENT, SERVE, STANDALONE, Launch, Tree
from portunus.supervisor.arbiter import Supervisor
from portunus.supervisor.policy import Role

SUPERVISOR = Path(__file__).resolve().parents[2] / "portunus" / "supervisor"
CHILD_PACKAGES = ("portunus.shard", "portunus.control", "portunus.web", "portunus.edge")


@pytest.fixture
def own() -> Iterator[dict[str, socket.socket]]:
    socks = {
        key: socket.socket() for key in ("operator_http_listen", "metrics_listen", "control_listen")
    }
    yield socks
    for s in socks.values():
        s.close()


@pytest.mark.parametrize(
    ("tree", "services", "source"),
    [
        (SERVE, ["control", "web"], Role.CONTROL),
        (CLIENT, ["link", "metrics"], Role.LINK),
        (STANDALONE, ["metrics"], None),
    ],
)
def test_each_tree_forks_its_shards_and_services(
    tree: Tree, services: list[str], source: Role | None, own: dict[str, socket.socket]
) -> None:
    kids = tree.children(Launch(Settings(shards=3), listeners=own))
    shards = [k for k in kids if k.role is Role.SHARD]
    assert [(k.name, k.title, k.index) for k in shards] == [
        (f"shard-{i}", f"portunus: shard {i}", i) for i in range(3)
    ]
    assert all(k.sockets == [] for k in shards), "shards get listeners over their channel"
    rest = [k for k in kids if k.role is not Role.SHARD]
    assert [(k.name, k.title) for k in rest] == [(n, f"portunus: {n}") for n in services]
    assert tree.source_role is source


def test_each_service_keeps_only_the_listeners_it_serves(own: dict[str, socket.socket]) -> None:
    kids = {k.name: k for k in SERVE.children(Launch(Settings(shards=1), listeners=own))}
    assert kids["control"].sockets == [own["control_listen"]]
    assert kids["web"].sockets == [own["operator_http_listen"], own["metrics_listen"]]
    (metrics,) = [
        k
        for k in STANDALONE.children(Launch(Settings(shards=1), listeners=own))
        if k.role is Role.METRICS
    ]
    assert metrics.sockets == [own["metrics_listen"]]


def test_a_tree_without_its_rule_source_is_refused(own: dict[str, socket.socket]) -> None:
    kids = STANDALONE.children(Launch(Settings(shards=1), listeners=own))
    with pytest.raises(ValueError, match="no control child"):
        Supervisor(
            children=kids,
            listen_address="127.0.0.1",
            shard_settings={},
            drain_secs=0,
            metrics_dir="",
            source_role=Role.CONTROL,
        )


def test_the_supervisor_imports_no_child_process_code() -> None:
    """Its children are handed in (process_trees.py): the supervisor package imports
    neither the shard nor control, web or the edge link, even inside a function."""
    found = []
    for path in sorted(SUPERVISOR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"{path.name}: {name}"
                for name in names
                if any(name == p or name.startswith(p + ".") for p in CHILD_PACKAGES)
            ]
    assert found == []
