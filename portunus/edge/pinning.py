"""TLS to the server with its certificate pinned by SHA-256 fingerprint.

The server's certificate is self-signed, so there is no CA to ask: trust comes
from the fingerprint the operator copied out of the enrollment URI.  The TLS
layer therefore verifies nothing (``CERT_NONE``) and we compare
``sha256(DER)`` ourselves, after the handshake and *before* a single byte of
ours (enrollment code, token) goes over the connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl

CONNECT_TIMEOUT = 10.0


class FingerprintMismatch(Exception):
    """The server presented a certificate other than the pinned one."""

    def __init__(self, expected: str, got: str, where: str) -> None:
        super().__init__(
            f"the server at {where} presented certificate {got}, but {expected} is pinned; "
            "refusing to send anything. If the server was reinstalled, enroll again with a "
            "fresh URI; otherwise something is intercepting the connection"
        )
        self.expected = expected
        self.got = got
        self.where = where


def fingerprint(der: bytes) -> str:
    """``sha256:<64 lowercase hex>`` of a DER certificate (docs/edge.md)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def client_context() -> ssl.SSLContext:
    """A client context that lets any certificate through the handshake: the pin,
    checked by ``open_pinned``, is the only authentication of the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def open_pinned(
    host: str, port: int, pinned: str, timeout: float = CONNECT_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect with TLS and check the pin; raise FingerprintMismatch (connection
    closed, nothing sent) or OSError/TimeoutError/ssl.SSLError on failure."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
    # races with completion, and the link's reconnect loop would then never stop.
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_context(), server_hostname=host
        )
    try:
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        got = fingerprint(der) if der else "no certificate"
        if got != pinned:
            raise FingerprintMismatch(pinned, got, where)
    except BaseException:
        writer.transport.abort()  # no close_notify dance with a host we do not trust
        raise
    return reader, writer


async def close_quietly(
    writer: asyncio.StreamWriter, timeout: float = 2.0, reader: asyncio.StreamReader | None = None
) -> None:
    """Close a TLS stream without letting a dead peer hold us up.  When ``reader``
    saw the peer close, abort at once: a close_notify to a socket the server already
    shut fails, and aborting mid-shutdown is what makes uvloop log tracebacks."""
    if reader is not None and (reader.at_eof() or reader.exception() is not None):
        writer.transport.abort()
        return
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()


def link_error(exc: BaseException) -> str:
    """A short human reason for a failed exchange with the server, for logs and errors."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
