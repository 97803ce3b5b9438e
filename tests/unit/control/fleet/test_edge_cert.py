"""The server certificate: generated once, key 0600, SANs, and the fingerprint the
TLS listener really presents is the one enrollment URIs carry."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from portunus.control.fleet.cert import ensure_server_cert

from .fake_edge import uri_parts


def test_generated_once_with_modes_and_sans(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cert = ensure_server_cert(str(data), "edge-gw.example.net")
    assert stat.S_IMODE(os.stat(cert.key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert.cert_path).st_mode) == 0o644
    parsed = x509.load_pem_x509_certificate(Path(cert.cert_path).read_bytes())
    key = parsed.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {"localhost", socket.gethostname(), "edge-gw.example.net"} <= dns
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= ips
    assert cert.fingerprint.startswith("sha256:") and len(cert.fingerprint) == 7 + 64
    mtime = os.stat(cert.cert_path).st_mtime_ns
    again = ensure_server_cert(str(data), "other.example.net")
    assert again.fingerprint == cert.fingerprint  # enrolled clients keep working
    assert os.stat(cert.cert_path).st_mtime_ns == mtime


def test_wildcard_listen_host_is_not_a_san(tmp_path: Path) -> None:
    cert = ensure_server_cert(str(tmp_path), "0.0.0.0")
    parsed = x509.load_pem_x509_certificate(Path(cert.cert_path).read_bytes())
    ips = parsed.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("0.0.0.0") not in ips


def test_missing_key_regenerates_both(tmp_path: Path) -> None:
    first = ensure_server_cert(str(tmp_path))
    os.unlink(first.key_path)
    second = ensure_server_cert(str(tmp_path))
    assert second.fingerprint != first.fingerprint
    assert os.path.exists(second.key_path)


async def test_uri_fingerprint_is_what_the_listener_presents(edge: Any) -> None:
    enrollment = await edge.call("clients.enroll", {"name": "edge-01", "address": "127.0.0.1"})
    host, port, code, fp = uri_parts(enrollment["uri"])
    assert (host, port) == ("127.0.0.1", edge.port)
    probe = edge.fake()
    probe.fingerprint = None  # do not pin: measure what is presented
    await probe.connect()
    assert probe.peer_fingerprint == fp == edge.cert.fingerprint
    # A client pinning another fingerprint notices before sending anything.
    tampered = edge.fake()
    tampered.fingerprint = "sha256:" + "0" * 64
    try:
        await tampered.connect()
    except AssertionError as exc:
        assert "fingerprint mismatch" in str(exc)
    else:
        raise AssertionError("a tampered fingerprint was accepted")


def test_the_gateway_context_sends_no_session_tickets(tmp_path: Path) -> None:
    """Edge clients never resume a TLS session, so the gateway sends no TLS 1.3
    tickets (two per handshake by default: work for nothing in a reconnect storm)."""
    ctx = ensure_server_cert(str(tmp_path)).ssl_context()
    assert ctx.num_tickets == 0
    assert ctx.minimum_version.name == "TLSv1_2"
