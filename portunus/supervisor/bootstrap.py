"""Preparing the supervisor's process before anything imports prometheus_client."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

from portunus import logs


def prepare_process(title: str, log_format: str, log_level: str = "info") -> None:
    logs.configure(fmt=log_format, process="supervisor", level=log_level)
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass
    os.environ["PORTUNUS_SUPERVISOR_PID"] = str(os.getpid())
    # One id per run of the service: counters restart with it (control/counters.py).
    os.environ["PORTUNUS_RUN_ID"] = uuid.uuid4().hex


def prepare_metrics_dir(runtime_dir: str | None) -> str:
    """Wipe and create the multiprocess dir and export it.

    Must run before the first ``import prometheus_client`` in this process: the
    client picks its value class (mmap files vs in-memory) at import time.  The
    value class is then ours (``portunus.metrics.store``): the same files, which
    shrink again when a removed rule's series are forgotten.
    """
    if runtime_dir:
        path = os.path.join(runtime_dir, "metrics")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, mode=0o750, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="portunus-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    from portunus.metrics import store

    store.install()
    return path
