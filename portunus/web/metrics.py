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

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.config import Settings


def _process_label(title: str) -> str | None:
    if not title.startswith("portunus: "):
        return None
    return title[len("portunus: ") :].split(" (")[0].strip().replace(" ", "-")


class ProcessCollector:
    """psutil figures for the supervisor and every child it forked."""

    def __init__(self, supervisor_pid: int) -> None:
        self.supervisor_pid = supervisor_pid

    def collect(self) -> Iterator[object]:
        import psutil
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rss = GaugeMetricFamily(
            "portunus_process_resident_memory_bytes", "Resident memory per Portunus process", labels=["process"]
        )
        cpu = CounterMetricFamily(
            "portunus_process_cpu_seconds_total", "CPU time per Portunus process", labels=["process"]
        )
        fds = GaugeMetricFamily("portunus_process_open_fds", "Open fds per Portunus process", labels=["process"])
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

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import GaugeMetricFamily

        labels = sorted(self.instance)
        info = GaugeMetricFamily("portunus_instance_info", "The program serving this endpoint", labels=labels)
        info.add_metric([self.instance[k] for k in labels], 1)
        yield info


def render_metrics(metrics_dir: str, supervisor_pid: int | None, instance: dict[str, str] | None = None) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    if supervisor_pid:
        registry.register(ProcessCollector(supervisor_pid))  # type: ignore[arg-type]
    if instance:
        registry.register(InstanceCollector(instance))  # type: ignore[arg-type]
    text = generate_latest(registry)
    # Drop the detail series (and their HELP/TYPE lines) from the exposition.
    return b"\n".join(ln for ln in text.split(b"\n") if b"portunus_detail_" not in ln)


def create_metrics_app(settings: Settings, instance: dict[str, str] | None = None) -> Starlette:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", settings.metrics_dir)
    supervisor_pid = int(os.environ.get("PORTUNUS_SUPERVISOR_PID", "0")) or None
    instance = instance or {"kind": "server", "config": ""}

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(render_metrics(metrics_dir, supervisor_pid, instance), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics)])


def run_metrics(settings: Settings, sock: socket.socket | None = None, channel: socket.socket | None = None,
                instance: dict[str, str] | None = None, key: str = "metrics_listen", where: str = "the config") -> None:
    """Serve only /metrics (standalone and edge client); runs in a forked child.

    ``sock`` is the listener the supervisor bound; without one (tests) it binds
    ``settings.metrics_listen`` itself and exits ``ChildExit.LISTEN_FAILED`` when
    it cannot.  Says ``up`` on ``channel`` once serving."""
    import uvicorn
    import uvloop

    from portunus.exitcodes import ChildExit
    from portunus.logs import log_event
    from portunus.supervisor.children import say_up
    from portunus.supervisor.own_listeners import BindError, bind

    if sock is None:
        try:
            sock = bind(settings.metrics_listen, key, "metrics endpoint", where)
        except BindError as exc:
            log_event("metrics.bind_failed", level="error", listen=settings.metrics_listen, message=str(exc))
            raise SystemExit(ChildExit.LISTEN_FAILED) from None
    config = uvicorn.Config(
        create_metrics_app(settings, instance), log_config=None, access_log=False, lifespan="off", loop="none",
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
