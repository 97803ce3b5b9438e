"""The benchmarks' peers live in the repository (bench/peers): the installer and the
runner are there and executable, the benchmarks find them by default, and run-peer
forwards real bytes (socat and nginx, where installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.features.nginx_origin import require_nginx
from tests.e2e.support import PortAllocator, echo, echo_roundtrip, wait_for

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / "bench" / "peers"


def test_peers_are_in_the_repository() -> None:
    for name in ("install", "run-peer"):
        assert os.access(PEERS / name, os.X_OK), name
    env = {k: v for k, v in os.environ.items() if k != "PORTUNUS_PEERS_DIR"}
    res = subprocess.run(
        [sys.executable, "-c", "import bench.common as c; print(c.PEERS_DIR)"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert res.stdout.strip() == str(PEERS)


def test_install_is_quiet_when_everything_is_present() -> None:
    """Idempotent: with the peers present it changes nothing and says nothing."""
    tools = ("haproxy", "nginx", "socat", "iperf3", "wrk", "sockperf")
    missing = [t for t in tools if not (shutil.which(t) or os.access(f"/usr/sbin/{t}", os.X_OK))]
    if missing or not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        pytest.skip(f"not every peer is installed ({', '.join(missing) or 'nginx stream module'})")
    res = subprocess.run([str(PEERS / "install")], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


@pytest.fixture
def run_peer(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.mark.parametrize("peer", ["socat", "nginx"])
def test_run_peer_forwards(
    peer: str,
    origin,
    ports: PortAllocator,
    run_peer,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    if peer == "nginx":
        require_nginx()
    elif shutil.which(peer) is None:
        pytest.skip(f"{peer} is not installed (bench/peers/install)")
    org = origin(echo)
    listen = ports.port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run_peer.append(
        subprocess.Popen(
            [str(PEERS / "run-peer"), peer, str(listen), org.address],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    )
    wait_for(lambda: _accepts(listen), 10, what=f"{peer} to listen on {listen}")
    assert echo_roundtrip(listen, b"through the peer\n" * 100)


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
