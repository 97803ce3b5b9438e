"""The server certificate that edge clients pin (docs/edge.md "Server certificate").

Generated once, by the control process on its first start, and kept in the data
dir: clients hold its fingerprint in their bundles, so regenerating it would cut
every enrolled client off.  Nothing here is a CA: clients compare the SHA-256 of
the certificate's DER to the pinned value and ignore names and dates, so the SAN
list only helps generic TLS tools (``openssl s_client``) make sense of it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portunus.fsutil import replace_file
from portunus.logs import log_event

CERT_FILE = "server.crt"
KEY_FILE = "server.key"
VALIDITY_DAYS = 3650


@dataclass(frozen=True, slots=True)
class ServerCert:
    cert_path: str
    key_path: str
    fingerprint: str  # "sha256:<64 lowercase hex>" of the DER

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context: TLS 1.2+, no client certificates (clients
        authenticate with their token inside the link)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # No TLS 1.3 session tickets: edge clients never resume (each link is one long
        # connection, and a restarted server has new ticket keys anyway), so the two
        # tickets OpenSSL sends by default are work for both sides on every handshake
        # of a reconnect storm, for nothing.
        ctx.num_tickets = 0
        # No TLS 1.2 renegotiation: the gateway's transport (tls_transport.py) then never
        # has to read before it can write, and a client cannot make the server redo
        # a handshake's work on an established link.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def fingerprint_of_der(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_of_pem(pem: bytes) -> str:
    return fingerprint_of_der(
        x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    )


def san_names(extra_host: str | None = None) -> list[str]:
    """The host name, localhost, the loopback addresses and ``extra_host`` (the
    address control_listen advertises, when it names one)."""
    names = [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    if extra_host and extra_host not in ("0.0.0.0", "::", ""):
        names.append(extra_host)
    out: list[str] = []
    for n in names:
        if n and n not in out:
            out.append(n)
    return out


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def generate(cert_path: str, key_path: str, names: list[str]) -> None:
    """Write a fresh ECDSA P-256 key (0600) and a self-signed certificate (0644).

    Both files are written next to their final names and renamed, key first, so a
    crash never leaves a certificate whose key is missing or half written.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "portunus")]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    replace_file(key_path, key_pem, 0o600)
    replace_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_server_cert(data_dir: str, advertised_host: str | None = None) -> ServerCert:
    """Load ``<data_dir>/server.crt`` + ``server.key``, generating them when either
    is missing (control process, before the gateway binds)."""
    cert_path = os.path.join(data_dir, CERT_FILE)
    key_path = os.path.join(data_dir, KEY_FILE)
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        os.makedirs(data_dir, exist_ok=True)
        names = san_names(advertised_host)
        generate(cert_path, key_path, names)
        log_event("edge.cert_generated", cert=cert_path, names=names)
    with open(cert_path, "rb") as f:
        fingerprint = fingerprint_of_pem(f.read())
    return ServerCert(cert_path, key_path, fingerprint)
