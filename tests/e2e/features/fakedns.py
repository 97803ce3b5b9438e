"""A scriptable DNS server on a loopback address, and a way to point a real shard at it.

The shard's resolver (portunus/shard/dns.py) reads its nameservers from
/etc/resolv.conf, always on port 53, and has no setting or environment variable to
override either.  So the process under test runs in a private mount namespace
(``unshare -m``, root only) where a test-owned resolv.conf is bind-mounted over
/etc/resolv.conf; the mount is private to that namespace and the machine's file is
never touched.  The fake server binds port 53 on a random 127.x.y.z address (port 53
is forced by the product; the address keeps it clear of anything else).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import socket
import struct
import threading
from collections import Counter
from pathlib import Path

TYPE_A = 1
TYPE_AAAA = 28
RCODE_NXDOMAIN = 3
RCODE_SERVFAIL = 2


def namespace_supported() -> str | None:
    """None if ``in_resolv_namespace`` can work here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root for unshare -m and port 53"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def in_resolv_namespace(argv: list[str], resolv_conf: Path) -> list[str]:
    """``argv`` run in a new mount namespace whose /etc/resolv.conf is ``resolv_conf``.

    ``unshare`` execs (no fork), so the returned command's pid is the program's.
    """
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(resolv_conf),
        *argv,
    ]


class FakeDns:
    """Answers A/AAAA queries from ``records``; every query is counted.

    ``records[name] = {"A": [...], "AAAA": [...], "ttl": n}``; ``mode[name]`` may be
    ``"servfail"`` (resolver failure: stale answers apply) or ``"drop"`` (no reply);
    unknown names are NXDOMAIN.  ``delay[name]`` seconds hold every reply for that
    name back (without blocking other names), to keep a lookup in flight.
    """

    def __init__(self) -> None:
        self.records: dict[str, dict[str, object]] = {}
        self.mode: dict[str, str] = {}
        self.delay: dict[str, float] = {}
        self.queries: Counter[tuple[str, int]] = Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rng = random.Random()
        for _ in range(50):
            addr = f"127.{rng.randrange(54, 250)}.{rng.randrange(1, 250)}.{rng.randrange(2, 250)}"
            try:
                self.sock.bind((addr, 53))
                break
            except OSError:
                continue
        else:
            self.sock.close()
            raise RuntimeError("no free 127.x.y.z:53 for the fake DNS server")
        self.address: str = addr
        self.sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-dns")
        self._thread.start()

    def write_resolv_conf(self, path: Path) -> Path:
        path.write_text(f"nameserver {self.address}\n")
        return path

    def count(self, name: str, qtype: int = TYPE_A) -> int:
        with self._lock:
            return self.queries[(name, qtype)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(ValueError, struct.error, IndexError, UnicodeDecodeError):
                name, reply = self._answer(data)
                if reply is None:
                    continue
                delay = self.delay.get(name, 0.0)
                if delay:
                    timer = threading.Timer(delay, self._send, (reply, addr))
                    timer.daemon = True
                    timer.start()
                else:
                    self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(reply, addr)

    def _answer(self, query: bytes) -> tuple[str, bytes | None]:
        qid, _flags, qdcount = struct.unpack_from("!3H", query)
        if qdcount != 1:
            raise ValueError("one question expected")
        off, labels = 12, []
        while query[off]:
            n = query[off]
            labels.append(query[off + 1 : off + 1 + n].decode())
            off += 1 + n
        off += 1
        qtype, _qclass = struct.unpack_from("!2H", query, off)
        question = query[12 : off + 4]
        name = ".".join(labels).lower()
        with self._lock:
            self.queries[(name, qtype)] += 1
            mode = self.mode.get(name, "ok")
            rec = self.records.get(name)
        if mode == "drop":
            return name, None
        rcode, answers = 0, b""
        count = 0
        if mode == "servfail":
            rcode = RCODE_SERVFAIL
        elif rec is None:
            rcode = RCODE_NXDOMAIN
        else:
            ttl = int(rec.get("ttl", 60))  # type: ignore[call-overload]
            key = "A" if qtype == TYPE_A else "AAAA" if qtype == TYPE_AAAA else ""
            for a in rec.get(key, []) if key else []:  # type: ignore[union-attr]
                raw = ipaddress.ip_address(a).packed
                answers += struct.pack("!HHHIH", 0xC00C, qtype, 1, ttl, len(raw)) + raw
                count += 1
        header = struct.pack("!6H", qid, 0x8180 | rcode, 1, count, 0, 0)
        return name, header + question + answers

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)
