"""The three process trees, declared once: which children each command runs.

``portunus-server serve``, ``portunus-client`` and ``portunus-standalone`` run
the same supervisor (supervisor/arbiter.py) over different children.  Each tree
below says which roles it forks, how many of each, what each runs and which of
the service's own listeners (bound before forking) each serves.  A command picks
its tree and hands it the values of one start (``Launch``); the supervisor is
handed the resulting children and never imports a child's code.  Each entry
point imports its process's modules in the forked child, so the supervisor
stays small and a respawn pays for nothing it does not run.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from portunus.config import Settings
from portunus.supervisor.children import Child
from portunus.supervisor.policy import Role

if TYPE_CHECKING:
    from portunus.edge.bundle import Bundle
    from portunus.edge.timing import LinkTiming


@dataclass(frozen=True)
class LinkArgs:
    """What the edge link needs besides the settings (portunus-client only)."""

    bundle: Bundle
    capabilities: list[str]
    timing: LinkTiming


@dataclass
class Launch:
    """One start of a tree: what its entry points read in the forked child."""

    settings: Settings
    # The service's own listeners, bound before forking, by their settings key.
    listeners: dict[str, socket.socket] = field(default_factory=dict)
    instance: dict[str, str] = field(default_factory=dict)  # who answers /metrics (metrics role)
    link: LinkArgs | None = None


# (launch, index, channel) -> None; runs in the forked child and must not return
# while the child should live.  ``index`` numbers the children of one branch.
Entry = Callable[[Launch, int, socket.socket], None]


def _one(settings: Settings) -> int:
    return 1


@dataclass(frozen=True)
class Branch:
    """``count(settings)`` children of one role, each running ``entry``."""

    role: Role
    entry: Entry
    count: Callable[[Settings], int] = _one
    serves: tuple[str, ...] = ()  # keys of Launch.listeners this child serves
    # Whether the child reads its channel for reloaded settings (web, control, link);
    # the supervisor sends ``settings`` frames only to those (supervisor/routing.py).
    takes_settings: bool = True


@dataclass(frozen=True)
class Tree:
    name: str
    branches: tuple[Branch, ...]
    source_role: Role | None = None  # whose channel carries the rules; None: read in-process

    def children(self, launch: Launch) -> list[Child]:
        """The supervisor's children for one start, shards numbered from 0."""
        kids = []
        for branch in self.branches:
            for i in range(branch.count(launch.settings)):
                numbered = branch.role is Role.SHARD
                kids.append(
                    Child(
                        name=f"{branch.role}-{i}" if numbered else str(branch.role),
                        title=f"portunus: {branch.role}" + (f" {i}" if numbered else ""),
                        entry=partial(branch.entry, launch, i),
                        role=branch.role,
                        index=i,
                        sockets=[launch.listeners[key] for key in branch.serves],
                        takes_settings=branch.takes_settings,
                    )
                )
        return kids


# ------------------------------------------------------------------ entry points


def shard_main(launch: Launch, index: int, channel: socket.socket) -> None:
    from portunus.shard.main import run_shard

    run_shard(index, channel)


def control_main(launch: Launch, index: int, channel: socket.socket) -> None:
    from portunus.control.main import run_control

    run_control(launch.settings, channel, launch.listeners["control_listen"])


def web_main(launch: Launch, index: int, channel: socket.socket) -> None:
    from portunus.web.main import run_web

    api, metrics = launch.listeners["operator_http_listen"], launch.listeners["metrics_listen"]
    run_web(launch.settings, api, metrics, channel)


def metrics_main(launch: Launch, index: int, channel: socket.socket) -> None:
    from portunus.web.metrics import run_metrics

    run_metrics(launch.settings, launch.listeners["metrics_listen"], channel, launch.instance)


def link_main(launch: Launch, index: int, channel: socket.socket) -> None:
    from portunus.edge.link import run_link

    link = launch.link
    assert link is not None, "the client tree is launched with LinkArgs"
    run_link(launch.settings, link.bundle, channel, link.capabilities, link.timing)


# ------------------------------------------------------------------ the trees

SHARDS = Branch(Role.SHARD, shard_main, count=Settings.shard_count)
# The metrics child says ``up`` and never reads its channel again: it has no live
# setting to apply, so it is not sent any.
METRICS = Branch(Role.METRICS, metrics_main, serves=("metrics_listen",), takes_settings=False)

SERVE = Tree(
    "serve",
    (
        SHARDS,
        Branch(Role.CONTROL, control_main, serves=("control_listen",)),
        Branch(Role.WEB, web_main, serves=("operator_http_listen", "metrics_listen")),
    ),
    source_role=Role.CONTROL,
)
CLIENT = Tree("client", (SHARDS, Branch(Role.LINK, link_main), METRICS), source_role=Role.LINK)
STANDALONE = Tree("standalone", (SHARDS, METRICS))
