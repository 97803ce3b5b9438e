"""Redeeming an enrollment URI for a bundle (the client side of docs/edge.md "Enrollment").

``portunus://HOST:PORT/enroll?code=CODE&fp=sha256:HEX`` names the server, a
one-time code and the fingerprint of the server certificate.  The exchange is one
frame each way over pinned TLS: ``enroll`` -> ``enrolled`` (or ``error``).  The
code is burned by the server the moment it answers, so callers check that they
can write the bundle *before* redeeming.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from portunus import __version__
from portunus.edge.bundle import FINGERPRINT_RE, Bundle
from portunus.edge.pinning import link_error, open_pinned
from portunus.ipc import edge_messages as em
from portunus.ipc.edge_wire import WireError, read_frame, write_frame

ENROLL_TIMEOUT = 15.0


class EnrollError(Exception):
    """Enrollment did not produce a bundle; ``code`` is the server's error code or a
    local one (``bad_uri``, ``unavailable``, ``protocol``)."""

    def __init__(self, code: str, message: str, retry_after: object = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after  # with ``busy``: seconds the server asks us to wait


@dataclass(frozen=True)
class EnrollTarget:
    host: str
    port: int
    code: str
    fingerprint: str

    @property
    def server(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_QUOTE_HINT = "copy it exactly as enroll-client printed it, inside single quotes"


def parse_enroll_uri(uri: str) -> EnrollTarget:
    """Check every part of the URI; the error says which part is wrong."""
    parts = urlsplit(uri.strip())
    if parts.scheme != "portunus":
        raise EnrollError("bad_uri", f"the URI must start with portunus:// ({_QUOTE_HINT})")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise EnrollError(
            "bad_uri", f"the URI's port is not a number 1-65535 ({_QUOTE_HINT})"
        ) from None
    if not host or port is None or not 0 < port < 65536:
        raise EnrollError("bad_uri", f"the URI must name HOST:PORT ({_QUOTE_HINT})")
    if parts.path.rstrip("/") != "/enroll":
        raise EnrollError(
            "bad_uri", f"the URI path must be /enroll, not {parts.path or '(empty)'!r}"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    codes, fps = query.get("code", []), query.get("fp", [])
    if len(codes) != 1 or not codes[0]:
        raise EnrollError("bad_uri", f"the URI has no code= ({_QUOTE_HINT})")
    if len(fps) != 1 or not fps[0]:
        raise EnrollError(
            "bad_uri",
            f"the URI has no fp= (an unquoted '&' in a shell cuts it off; {_QUOTE_HINT})",
        )
    fp = fps[0].lower()
    if not FINGERPRINT_RE.fullmatch(fp):
        raise EnrollError("bad_uri", f"fp={fps[0]!r} is not sha256:<64 hex digits>")
    return EnrollTarget(host=host, port=port, code=codes[0], fingerprint=fp)


async def redeem(target: EnrollTarget, timeout: float = ENROLL_TIMEOUT) -> Bundle:
    """Run the exchange; raise EnrollError, or FingerprintMismatch from the pin check."""
    try:
        reader, writer = await open_pinned(target.host, target.port, target.fingerprint, timeout)
    except (TimeoutError, OSError) as exc:
        raise EnrollError(
            "unavailable", f"cannot reach {target.server}: {link_error(exc)}"
        ) from None
    try:
        await write_frame(writer, em.Enroll(code=target.code, version=__version__))
        reply = await asyncio.wait_for(read_frame(reader), timeout)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, WireError) as exc:
        raise EnrollError(
            "unavailable",
            f"{target.server} closed the enrollment without an answer: {link_error(exc)}",
        ) from None
    finally:
        # The exchange is over either way and the server closes right after its
        # answer: no TLS close_notify dance with a socket the peer already shut
        # (under an enrollment storm that dance is what failed, noisily).
        writer.transport.abort()
    bad = [k for k in ("client_id", "client_name", "token") if not _text(reply.get(k))]
    if reply["type"] == "enrolled" and bad:
        raise EnrollError("protocol", f"the server's 'enrolled' answer lacks {', '.join(bad)}")
    try:
        answer = em.parse(reply)
    except em.FrameInvalid as exc:
        raise EnrollError("protocol", f"the server's answer does not fit: {exc}") from None
    if isinstance(answer, em.Error):
        raise EnrollError(answer.code or "enrollment_invalid", answer.message, answer.retry_after)
    if not isinstance(answer, em.Enrolled):
        raise EnrollError(
            "protocol", f"the server answered {em.kind(answer)!r} instead of 'enrolled'"
        )
    return Bundle(
        server=target.server,
        fingerprint=target.fingerprint,
        client_id=answer.client_id,
        client_name=answer.client_name,
        token=answer.token,
    )


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value)
