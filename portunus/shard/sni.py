"""TLS ClientHello peeking and SNI rule selection for SNI-routed ports.

A shard accepting on an SNI port reads bytes into a buffer and calls
:func:`extract_sni` after every read until it returns ``(True, name)`` or raises
:class:`ClientHelloError`; it then picks a rule with :meth:`SniTable.match` and replays
the whole buffer, byte for byte, to that rule's target.  Nothing here decrypts, does
I/O or keeps state between calls: the parser re-reads the buffer from the start each
time (a ClientHello is at most ``MAX_CLIENT_HELLO`` bytes, so that costs little and
keeps fragmented, many-segment arrivals trivially correct).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CLIENT_HELLO_TIMEOUT_SECS",
    "MAX_CLIENT_HELLO",
    "ClientHelloError",
    "SniTable",
    "extract_sni",
]

MAX_CLIENT_HELLO = 16384
"""Bytes the shard peeks at most; a ClientHello not complete within them is ``oversize``."""
CLIENT_HELLO_TIMEOUT_SECS = 5.0
"""How long a shard waits for a complete ClientHello (``sni_client_hello_timeout_secs``)."""

_CT_HANDSHAKE = 22
_HS_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST = 0
_RECORD_HEADER = 5
_HS_HEADER = 4
_MAX_RECORD = 1 << 14  # TLSPlaintext.length must not exceed 2^14 (RFC 8446 5.1)
# version(2) random(32) session_id_len(1) suites_len(2) suite(2) comp_len(1) comp(1)
_MIN_HELLO_BODY = 41


class ClientHelloError(Exception):
    """The peeked bytes cannot be (or cannot become) a usable TLS ClientHello.

    ``reason`` is a short token for logs and metrics: ``not_tls`` (first record is not
    a TLS handshake record), ``not_handshake`` (a non-handshake record before the hello
    was complete), ``not_client_hello`` (first handshake message of another type),
    ``oversize`` (no complete hello within ``max_size`` bytes) or ``malformed``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def extract_sni(
    buf: bytes | bytearray | memoryview, max_size: int = MAX_CLIENT_HELLO
) -> tuple[bool, str | None]:
    """Return ``(False, None)`` while more bytes are needed, ``(True, name)`` once done.

    Called by the shard after every read with everything peeked so far.  ``name`` is
    the ``host_name`` from the server_name extension, lower-cased and without a
    trailing dot, or ``None`` when the hello carries no SNI.  The hello may be split
    over several handshake records and any number of reads.  A hello counts as complete
    when its last byte lies within the first ``max_size`` bytes of ``buf``; bytes after
    it (a ChangeCipherSpec, early data) are ignored.  Raises :class:`ClientHelloError`
    (and nothing else) as soon as the bytes cannot lead to a usable hello.
    """
    # Release the views before returning: a live export would stop the caller from
    # growing its bytearray (and a traceback keeps frames alive).
    with memoryview(buf) as raw, raw.cast("B") as view:
        total = len(view)
        data = bytes(view[:max_size])
    n = len(data)
    hs = bytearray()
    pos = 0
    first = True
    while pos < n:
        _check_record_header(data[pos : pos + _RECORD_HEADER], first)
        if n - pos < _RECORD_HEADER:
            break
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if rlen == 0 or rlen > _MAX_RECORD:
            raise ClientHelloError("malformed", f"handshake record length {rlen}")
        # A record still arriving contributes what it has; pos then lies past the end.
        hs += data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + rlen]
        pos += _RECORD_HEADER + rlen
        first = False
        if hs and hs[0] != _HS_CLIENT_HELLO:
            raise ClientHelloError("not_client_hello", f"handshake type {hs[0]}")
        if len(hs) >= _HS_HEADER:
            need = _HS_HEADER + int.from_bytes(hs[1:4], "big")
            # Even packed into a single record the hello would not fit the peek bound.
            if _RECORD_HEADER + need > max_size:
                raise ClientHelloError("oversize", f"ClientHello of {need} bytes")
            if len(hs) >= need:
                return True, _parse_client_hello(bytes(hs[_HS_HEADER:need]))
    if total >= max_size:
        raise ClientHelloError("oversize", f"no complete ClientHello in {max_size} bytes")
    return False, None


def _check_record_header(header: bytes, first: bool) -> None:
    """Validate as much of a (possibly partial) record header as has arrived."""
    if header[0] != _CT_HANDSHAKE:
        if first:
            raise ClientHelloError("not_tls", f"first byte 0x{header[0]:02x}")
        raise ClientHelloError("not_handshake", f"record type {header[0]}")
    if len(header) > 1 and header[1] != 3:
        raise ClientHelloError(
            "not_tls" if first else "malformed", f"record version major {header[1]}"
        )


def _u16(body: bytes, p: int) -> int:
    if p + 2 > len(body):
        raise ClientHelloError("malformed", "length field past the end of the hello")
    return (body[p] << 8) | body[p + 1]


def _skip(body: bytes, p: int, length: int, what: str) -> int:
    end = p + length
    if end > len(body):
        raise ClientHelloError("malformed", f"{what} longer than the hello")
    return end


def _parse_client_hello(body: bytes) -> str | None:
    """Walk a ClientHello body (after the 4-byte handshake header) to server_name."""
    n = len(body)
    if n < _MIN_HELLO_BODY:
        raise ClientHelloError("malformed", f"ClientHello body of {n} bytes")
    if body[0] != 3:
        raise ClientHelloError("malformed", f"client_version major {body[0]}")
    p = 34  # legacy_version + random
    sid_len = body[p]
    if sid_len > 32:
        raise ClientHelloError("malformed", f"session id of {sid_len} bytes")
    p = _skip(body, p + 1, sid_len, "session id")
    suites = _u16(body, p)
    if suites < 2 or suites % 2:
        raise ClientHelloError("malformed", f"cipher_suites of {suites} bytes")
    p = _skip(body, p + 2, suites, "cipher_suites")
    if p >= n:
        raise ClientHelloError("malformed", "no compression_methods")
    comp = body[p]
    if comp < 1:
        raise ClientHelloError("malformed", "empty compression_methods")
    p = _skip(body, p + 1, comp, "compression_methods")
    if p == n:
        return None  # pre-extension client: no SNI possible
    ext_total = _u16(body, p)
    p += 2
    if p + ext_total != n:
        raise ClientHelloError("malformed", "extensions block does not end the hello")
    seen: set[int] = set()
    name: str | None = None
    while p < n:
        etype = _u16(body, p)
        elen = _u16(body, p + 2)
        start = p + 4
        p = _skip(body, start, elen, f"extension {etype}")
        if etype in seen:
            raise ClientHelloError("malformed", f"duplicate extension {etype}")
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            name = _parse_server_name(body[start:p])
    return name


def _parse_server_name(ext: bytes) -> str | None:
    """RFC 6066 ServerNameList; the first (and only allowed) host_name wins."""
    list_len = _u16(ext, 0)
    if list_len == 0 or list_len + 2 != len(ext):
        raise ClientHelloError("malformed", "server_name list length")
    p = 2
    name: str | None = None
    while p < len(ext):
        name_type = ext[p]
        nlen = _u16(ext, p + 1)
        start = p + 3
        p = _skip(ext, start, nlen, "server name")
        if name_type != _NAME_TYPE_HOST:
            continue
        if name is not None:
            raise ClientHelloError("malformed", "more than one host_name")
        name = _normalize_host(ext[start:p])
    return name


def _normalize_host(raw: bytes) -> str:
    # Printable ASCII only: a NUL or space in a routing key is an attack, not a name.
    if not raw or any(b < 0x21 or b > 0x7E for b in raw):
        raise ClientHelloError("malformed", "host_name is not printable ASCII")
    name = raw.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ClientHelloError("malformed", "empty host_name")
    return name


def _normalize_pattern(pattern: str) -> str:
    return pattern.strip().lower().rstrip(".")


class SniTable:
    """Rule selection for one SNI port: exact name > single-label wildcard > fallback.

    Built by the shard whenever the set of rules on the port changes (it is immutable
    afterwards).  Patterns come from validated rules (``rules.validate_sni_pattern``);
    a duplicate pattern or a second fallback is a ``ValueError`` because the control
    plane rejects those as ``port_conflict`` before they reach a shard.
    """

    __slots__ = ("_exact", "_wildcard", "_fallback")

    def __init__(self, entries: Iterable[tuple[str | None, str]]) -> None:
        self._exact: dict[str, str] = {}
        self._wildcard: dict[str, str] = {}  # keyed by the suffix after "*."
        self._fallback: str | None = None
        for pattern, rule_id in entries:
            if pattern is None:
                if self._fallback is not None:
                    raise ValueError(f"two fallback rules: {self._fallback}, {rule_id}")
                self._fallback = rule_id
                continue
            p = _normalize_pattern(pattern)
            if p.startswith("*."):
                table, key = self._wildcard, p[2:]
            else:
                table, key = self._exact, p
            if not key or "*" in key:
                raise ValueError(f"invalid SNI pattern {pattern!r}")
            if key in table:
                raise ValueError(f"duplicate SNI pattern {pattern!r}: {table[key]}, {rule_id}")
            table[key] = rule_id

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcard) + (self._fallback is not None)

    def match(self, name: str | None) -> tuple[str, str] | None:
        """``(rule_id, "exact"|"wildcard"|"fallback")`` for a server name, else None."""
        if name is not None:
            host = name.lower()
            if host.endswith("."):
                host = host[:-1]
            rule_id = self._exact.get(host)
            if rule_id is not None:
                return rule_id, "exact"
            label, dot, rest = host.partition(".")
            if label and dot and rest:
                rule_id = self._wildcard.get(rest)
                if rule_id is not None:
                    return rule_id, "wildcard"
        if self._fallback is not None:
            return self._fallback, "fallback"
        return None
