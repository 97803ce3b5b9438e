"""The /metrics endpoint: every shard's multiprocess files summed, plus process facts.

A fresh CollectorRegistry + MultiProcessCollector per request (the files change
under us); ``portunus_detail_*`` series are for ``rule-stats`` and not exported.
Per-process figures (``portunus_process_*{process=...}``) are read with psutil from
the supervisor's process tree at scrape time, naming each process from the title
the supervisor gave it (``portunus: shard 2`` -> ``shard-2``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.config import Settings
from portunus.metrics import catalog as c

if TYPE_CHECKING:  # for the annotation only: prometheus_client is imported late, on purpose
    from prometheus_client.metrics_core import Metric


def _process_label(title: str) -> str | None:
    if not title.startswith("portunus: "):
        return None
    return title[len("portunus: ") :].split(" (")[0].strip().replace(" ", "-")


class ProcessCollector:
    """psutil figures for the supervisor and every child it forked."""

    def __init__(self, supervisor_pid: int) -> None:
        self.supervisor_pid = supervisor_pid

    def collect(self) -> Iterator[Metric]:
        import psutil

        rss = c.PROCESS_RSS.family()
        cpu = c.PROCESS_CPU.family()
        fds = c.PROCESS_FDS.family()
        try:
            root = psutil.Process(self.supervisor_pid)
            procs = [root, *root.children(recursive=False)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                with p.oneshot():
                    label = _process_label(" ".join(p.cmdline()) or p.name())
                    if label is None:
                        continue
                    times = p.cpu_times()
                    rss.add_metric([label], p.memory_info().rss)
                    cpu.add_metric([label], times.user + times.system)
                    fds.add_metric([label], p.num_fds())
            except psutil.Error:
                continue
        yield rss
        yield cpu
        yield fds


class InstanceCollector:
    """``portunus_instance_info{kind, config} 1``: which program serves this /metrics
    and from which file, so ``portunus-standalone stats`` can refuse to show another
    process's rules when its config's metrics_listen points elsewhere."""

    def __init__(self, instance: dict[str, str]) -> None:
        self.instance = instance

    def collect(self) -> Iterator[Metric]:
        labels = sorted(self.instance)
        info = c.INSTANCE_INFO.family(tuple(labels))
        info.add_metric([self.instance[k] for k in labels], 1)
        yield info


# Rule series that a restart must not reset, and the key of each in the totals file.
_CARRIED = {
    m.family_name: c.RULE_FIELDS[m.name]
    for m in (c.RULE_BYTES_IN, c.RULE_BYTES_OUT, c.RULE_CONNECTIONS)
}
_ACTIVE = c.RULE_ACTIVE.family_name


class CarriedCollector:
    """The shards' series, with each local rule's total from earlier runs added and
    every edge client's rules appended (labels ``client`` = the client's name), from
    the control process's ``rule_counters.json`` (portunus/control/counters.py)."""

    def __init__(self, metrics_dir: str, totals: dict[str, Any]) -> None:
        self.metrics_dir = metrics_dir
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector
        from prometheus_client.samples import Sample

        local = self.totals.get("local") or {}
        remote = self.totals.get("remote") or {}
        if self.totals.get("run") != os.environ.get("PORTUNUS_RUN_ID"):
            # Written by an earlier run: its final totals are this run's base.
            local = {rid: {**row, **(row.get("known") or {})} for rid, row in local.items()}
        missing = {*_CARRIED, _ACTIVE}
        for family in [
            *MultiProcessCollector(None, path=self.metrics_dir).collect(),
            *_empty_families(),
        ]:
            if family.name in _CARRIED or family.name == _ACTIVE:
                if family.name not in missing:
                    continue  # the shards have it: skip the empty stand-in
                missing.discard(family.name)
            key = _CARRIED.get(family.name)
            if key is None and family.name != _ACTIVE:
                yield family
                continue
            seen: set[str] = set()
            samples = []
            for smp in family.samples:
                rid = smp.labels.get("rule", "")
                extra = (
                    local.get(rid)
                    if key is not None and smp.name == family.name + "_total"
                    else None
                )
                if extra is not None and smp.labels.get("client") == extra.get("client"):
                    seen.add(rid)
                    smp = Sample(
                        smp.name, smp.labels, smp.value + float(extra.get(key) or 0), smp.timestamp
                    )
                samples.append(smp)
            if key is not None:
                for rid, row in local.items():
                    if rid not in seen:  # counted in earlier runs, no live series yet
                        samples.append(
                            Sample(
                                family.name + "_total", _labels(rid, row), float(row.get(key) or 0)
                            )
                        )
            for rid, row in remote.items():
                value = row.get(key if key is not None else "active_connections")
                suffix = "_total" if key is not None else ""
                samples.append(Sample(family.name + suffix, _labels(rid, row), float(value or 0)))
            family.samples = samples
            yield family


def _empty_families() -> list[Any]:
    """Stand-ins for rule series no shard has written yet (no local rule at all),
    so edge clients' rules and earlier runs' totals are exported even then."""
    return [c.BY_FAMILY[name].family() for name in (*_CARRIED, _ACTIVE)]


def _labels(rule_id: str, row: dict[str, Any]) -> dict[str, str]:
    return {
        "client": str(row.get("client", "")),
        "rule": rule_id,
        "owner": str(row.get("owner", "")),
    }


def render_metrics(
    metrics_dir: str,
    supervisor_pid: int | None,
    instance: dict[str, str] | None = None,
    totals: dict[str, Any] | None = None,
) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if totals and (totals.get("local") or totals.get("remote")):
        registry.register(CarriedCollector(metrics_dir, totals))
    else:
        MultiProcessCollector(registry, path=metrics_dir)
    if supervisor_pid:
        registry.register(ProcessCollector(supervisor_pid))
    if instance:
        registry.register(InstanceCollector(instance))
    text = generate_latest(registry)
    # Drop the detail series (and their HELP/TYPE lines) from the exposition.
    detail = c.DETAIL_PREFIX.encode()
    return b"\n".join(ln for ln in text.split(b"\n") if detail not in ln)


def create_metrics_app(settings: Settings, instance: dict[str, str] | None = None) -> Starlette:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", settings.metrics_dir)
    supervisor_pid = int(os.environ.get("PORTUNUS_SUPERVISOR_PID", "0")) or None
    server = instance is None
    instance = instance or {"kind": "server", "config": ""}

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from portunus.control.counters import read_totals_file

        totals = read_totals_file(settings.runtime_dir) if server else None
        return Response(
            render_metrics(metrics_dir, supervisor_pid, instance, totals),
            media_type=CONTENT_TYPE_LATEST,
        )

    return Starlette(routes=[Route("/metrics", metrics)])


def run_metrics(
    settings: Settings,
    sock: socket.socket | None = None,
    channel: socket.socket | None = None,
    instance: dict[str, str] | None = None,
    key: str = "metrics_listen",
    where: str = "the config",
) -> None:
    """Serve only /metrics (standalone and edge client); runs in a forked child.

    ``sock`` is the listener the supervisor bound; without one (tests) it binds
    ``settings.metrics_listen`` itself and exits ``ChildExit.LISTEN_FAILED`` when
    it cannot.  Says ``up`` on ``channel`` once serving."""
    import uvicorn
    import uvloop

    from portunus.exitcodes import ChildExit
    from portunus.ipc.channel_end import say_up
    from portunus.logs import log_event
    from portunus.supervisor.own_listeners import BindError, bind

    if sock is None:
        try:
            sock = bind(settings.metrics_listen, key, "metrics endpoint", where)
        except BindError as exc:
            log_event(
                "metrics.bind_failed",
                level="error",
                listen=settings.metrics_listen,
                message=str(exc),
            )
            raise SystemExit(ChildExit.LISTEN_FAILED) from None
    config = uvicorn.Config(
        create_metrics_app(settings, instance),
        log_config=None,
        access_log=False,
        lifespan="off",
        loop="none",
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started and channel is not None:
            say_up(channel)
        await task

    uvloop.run(serve())
