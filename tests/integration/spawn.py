"""Start one product process the way the supervisor does, the test holding the
other end of its channel."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONTROL_CHILD = """
import socket, sys
from portunus.config import Settings
from portunus.control.main import run_control
s = Settings(data_dir=sys.argv[2], runtime_dir=sys.argv[3], operator_token=sys.argv[4],
             control_listen=sys.argv[5])
run_control(s, socket.socket(fileno=int(sys.argv[1])))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_control(
    data: Path, run: Path, token: str, control_listen: str
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start ``run_control`` in a child process the way the supervisor does: its
    channel is one end of a socketpair (we keep the other, returned with the
    process), its metrics go to ``run/metrics`` (which must exist), stderr is piped."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(run / "metrics"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CONTROL_CHILD,
            str(theirs.fileno()),
            str(data),
            str(run),
            token,
            control_listen,
        ],
        pass_fds=[theirs.fileno()],
        env=env,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    return proc, ours
