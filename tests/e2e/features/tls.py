"""Real TLS on both ends of an SNI-routed port: a test CA, origins that terminate
TLS with their own certificates, and clients (Python ``ssl``) that verify them.

An origin answers a completed handshake with ``<its name>|<SNI it received>\\n``
and then echoes, so a client knows which origin it reached, that the replayed
ClientHello arrived intact (the origin saw the same SNI) and that bytes flow both
ways afterwards.  ``handshake_bytes`` drives a handshake through memory BIOs so a
test can reshape the first flight (split across TCP segments or TLS records).
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.features.helpers import read_line
from tests.e2e.support import LOOPBACK, ConnRecord, recv_exact


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A throw-away CA in ``workdir`` that signs leaf certificates for given names."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("portunus test CA"))
            .issuer_name(_name("portunus test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = workdir / "ca.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, label: str, names: list[str]) -> tuple[Path, Path]:
        """(cert, key) files for a server certificate valid for ``names``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.dir / f"{label}.crt", self.dir / f"{label}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        ctx.check_hostname = check_hostname
        return ctx


def tls_origin_handler(
    label: str, cert: Path, key: Path
) -> Callable[[socket.socket, ConnRecord], None]:
    """Origin handler: TLS server handshake, then ``label|sni\\n``, then echo."""

    def handler(conn: socket.socket, rec: ConnRecord) -> None:
        seen: list[str | None] = []

        def on_sni(
            _obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext
        ) -> None:
            seen.append(name)

        # A context per connection: the SNI callback records into this connection only.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        ctx.sni_callback = on_sni  # type: ignore[assignment]
        conn.settimeout(10)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            rec.extra["sni"] = seen[0] if seen else None
            tls.sendall(f"{label}|{rec.extra['sni'] or '-'}\n".encode())
            while data := tls.recv(65536):
                rec.rx.update(data)
                tls.sendall(data)

    return handler


def tls_visit(
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str | None,
    payload: bytes = b"",
    timeout: float = 10.0,
) -> str:
    """Handshake through ``port``; return the origin's ``label|sni`` line after checking
    that ``payload`` comes back intact."""
    with (
        socket.create_connection((LOOPBACK, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        line = read_line(tls).decode().strip()
        if payload:
            tls.sendall(payload)
            assert recv_exact(tls, len(payload)) == payload
        return line


def split_into_records(flight: bytes, pieces: int) -> bytes:
    """Re-frame the first TLS record of ``flight`` (the ClientHello) as ``pieces``
    handshake records; what follows it is kept as is."""
    assert flight[0] == 22, "the first flight must start with a handshake record"
    length = int.from_bytes(flight[3:5], "big")
    body, rest = flight[5 : 5 + length], flight[5 + length :]
    step = -(-len(body) // pieces)
    out = bytearray()
    for i in range(0, len(body), step):
        chunk = body[i : i + step]
        out += flight[:3] + len(chunk).to_bytes(2, "big") + chunk
    return bytes(out + rest)


def tls_visit_reshaped(
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str,
    reshape: Callable[[bytes], bytes],
    segment: int | None = None,
    gap: float = 0.0,
    timeout: float = 10.0,
) -> str:
    """Like ``tls_visit``, but the ClientHello bytes go through ``reshape`` and are
    written ``segment`` bytes at a time with ``gap`` seconds between writes
    (TCP_NODELAY on), so they arrive in many TCP segments."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        first = True
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = outgoing.read()
            if out:
                if first:
                    out, first = reshape(out), False
                    step = segment or len(out)
                    for i in range(0, len(out), step):
                        s.sendall(out[i : i + step])
                        if gap:
                            time.sleep(gap)
                else:
                    s.sendall(out)
            if done:
                break
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            incoming.write(data)
        line = b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            try:
                line += obj.read(1)
                continue
            except ssl.SSLWantReadError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("no origin line")
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed before the origin line")
            incoming.write(data)
        return line.decode().strip()
