"""In-container helper for the packaging tests: stdlib only, run by the
container's own /usr/bin/python3.11 (never the package's venv, so a broken
package cannot make its own test pass).

    probe.py freeport                 print a free TCP port on 127.0.0.1
    probe.py echo PORT                serve a TCP echo on 127.0.0.1:PORT (foreground)
    probe.py wait PORT [SECS]         until 127.0.0.1:PORT accepts (exit 1 on timeout)
    probe.py roundtrip PORT [BYTES]   send random bytes, check the echo; print JSON
    probe.py hold PORT -- CMD ...     roundtrip, run CMD, roundtrip again on the SAME
                                      connection, then on a new one; print JSON
    probe.py loop PORT -- CMD ...     a connect loop while CMD runs and 2 s more:
                                      counts ok / refused / other; print JSON
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def wait_port(port: int, secs: float) -> bool:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def exchange(sock: socket.socket, size: int) -> bool:
    """Send ``size`` random bytes and read as many back; True when identical."""
    payload = os.urandom(size)
    sock.sendall(payload)
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(min(1 << 20, size - len(got)))
        if not chunk:
            break
        got += chunk
    return hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def roundtrip(port: int, size: int) -> dict[str, object]:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            return {"ok": exchange(s, size), "bytes": size}
    except OSError as exc:
        return {"ok": False, "error": str(exc)}


def hold(port: int, cmd: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        out["before"] = exchange(s, 65536)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        out["command_rc"] = proc.returncode
        out["command_output"] = (proc.stdout + proc.stderr)[-2000:]
        try:
            out["same_connection_after"] = exchange(s, 65536)
        except OSError as exc:
            out["same_connection_after"] = False
            out["error"] = str(exc)
    out["new_connection_after"] = roundtrip(port, 65536)["ok"]
    return out


def loop(port: int, cmd: list[str], after: float = 2.0) -> dict[str, object]:
    """Connect to ``port`` over and over (3 threads, 64 KiB round trips) while ``cmd``
    runs and ``after`` seconds more; count refusals and other failures."""
    import threading

    counts = {"ok": 0, "refused": 0}
    other: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                    ok = exchange(s, 65536)
                with lock:
                    if ok:
                        counts["ok"] += 1
                    else:
                        other.append("short echo")
            except ConnectionRefusedError:
                with lock:
                    counts["refused"] += 1
            except OSError as exc:
                with lock:
                    other.append(str(exc))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    time.sleep(after)
    stop.set()
    for t in threads:
        t.join(70)
    return {
        **counts,
        "other": other[:10],
        "command_rc": proc.returncode,
        "command_output": (proc.stdout + proc.stderr)[-2000:],
    }


def main(argv: list[str]) -> int:
    verb = argv[0]
    if verb == "freeport":
        print(free_port())
        return 0
    if verb == "echo":
        with _Server(("127.0.0.1", int(argv[1])), _Echo) as srv:
            srv.serve_forever()
        return 0
    if verb == "wait":
        return 0 if wait_port(int(argv[1]), float(argv[2]) if len(argv) > 2 else 10.0) else 1
    if verb == "roundtrip":
        result = roundtrip(int(argv[1]), int(argv[2]) if len(argv) > 2 else 1 << 20)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if verb == "hold":
        sep = argv.index("--")
        print(json.dumps(hold(int(argv[1]), argv[sep + 1 :])))
        return 0
    if verb == "loop":
        sep = argv.index("--")
        print(json.dumps(loop(int(argv[1]), argv[sep + 1 :])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
