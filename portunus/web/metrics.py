"""The /metrics endpoint: every shard's multiprocess files summed, plus process facts.

A fresh CollectorRegistry + MultiProcessCollector per request (the files change
under us); ``portunus_detail_*`` series are for ``rule-stats`` and not exported.
Per-process figures (``portunus_process_*{process=...}``) are read with psutil from
the supervisor's process tree at scrape time, naming each process from the title
the supervisor gave it (``portunus: shard 2`` -> ``shard-2``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portunus.config import Settings

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


def render_metrics(metrics_dir: str, supervisor_pid: int | None) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    if supervisor_pid:
        registry.register(ProcessCollector(supervisor_pid))
    text = generate_latest(registry)
    # Drop the detail series (and their HELP/TYPE lines) from the exposition.
    return b"\n".join(ln for ln in text.split(b"\n") if b"portunus_detail_" not in ln)


def create_metrics_app(settings: Settings) -> Starlette:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", settings.metrics_dir)
    supervisor_pid = int(os.environ.get("PORTUNUS_SUPERVISOR_PID", "0")) or None

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(render_metrics(metrics_dir, supervisor_pid), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics)])


def run_metrics(settings: Settings) -> None:
    """Serve only /metrics (standalone and edge client); runs in a forked child."""
    import asyncio

    import uvicorn
    import uvloop

    from portunus.config import parse_listen
    from portunus.logs import log_event

    host, port = parse_listen(settings.metrics_listen, "metrics_listen")
    config = uvicorn.Config(
        create_metrics_app(settings), host=host, port=port, log_config=None, access_log=False,
        lifespan="off", loop="none",
    )
    server = uvicorn.Server(config)
    try:
        uvloop.run(server.serve())
    except SystemExit:
        raise
    except OSError as exc:
        log_event("metrics.bind_failed", level="error", listen=settings.metrics_listen, error=str(exc),
                  hint="change metrics_listen")
        raise SystemExit(1) from None
    _ = asyncio
