"""PROXY protocol v1/v2 headers, per https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.

The shard calls :func:`build_header` once per connection to a target of a rule with
``proxy_protocol`` set and writes the result before any client byte, so the target
learns the real client address.  :func:`parse_header` is the inverse, for tests and
debugging; the data plane never parses headers.

Addresses are normalized the way a kernel would present them: an IPv4-mapped IPv6
address (``::ffff:192.0.2.1``, what a dual-stack listener reports for IPv4 clients) is
written as IPv4, and if source and destination still differ in family the IPv4 one is
promoted to IPv4-mapped IPv6, because one header carries one address family.
"""

from __future__ import annotations

import ipaddress
import re
import struct

__all__ = ["V1_MAX_LEN", "V2_SIGNATURE", "build_header", "parse_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LEN = 107  # spec section 2.1: the longest v1 line, CRLF included

_V2_VERSION = 0x2
_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1
_V2_AF_INET = 0x1
_V2_AF_INET6 = 0x2
_V2_TRANSPORT = {"tcp": 0x1, "udp": 0x2}
_V2_ADDR_LEN = {_V2_AF_INET: 12, _V2_AF_INET6: 36}
_V2_FIXED = 16  # signature + ver/cmd + fam/proto + length
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: object) -> _IP:
    if not isinstance(host, str):
        raise ValueError(f"address must be an IP literal string, got {host!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(ip.packed)  # a zone cannot travel in the header
    return ip


def _port(port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    return port


def _mapped(ip: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


def _text(ip: _IP) -> str:
    """RFC 5952 text; IPv4-mapped in mixed notation (section 5), as nginx and haproxy print it."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def build_header(
    version: str, src: tuple[str, int], dst: tuple[str, int], protocol: str = "tcp"
) -> bytes:
    """The PROXY header describing a ``src`` → ``dst`` connection (``PROXY`` command).

    ``src``/``dst`` are ``(ip_literal, port)``; longer sockaddr tuples such as an IPv6
    ``getpeername()`` result are accepted (only the first two items are used).
    ``version`` is ``"v1"`` (text, TCP only) or ``"v2"`` (binary); ``protocol`` is
    ``"tcp"`` or ``"udp"``.  Raises ``ValueError`` for anything not representable.
    """
    transport = _V2_TRANSPORT.get(protocol)
    if transport is None:
        raise ValueError(f"protocol must be 'tcp' or 'udp', got {protocol!r}")
    if version not in ("v1", "v2"):
        raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', got {version!r}")
    if version == "v1" and protocol != "tcp":
        raise ValueError("PROXY protocol v1 cannot describe UDP; use v2")
    sip, sport = _ip(src[0]), _port(src[1])
    dip, dport = _ip(dst[0]), _port(dst[1])
    if sip.version != dip.version:
        if isinstance(sip, ipaddress.IPv4Address):
            sip = _mapped(sip)
        if isinstance(dip, ipaddress.IPv4Address):
            dip = _mapped(dip)
    if version == "v1":
        v1_family = "TCP4" if sip.version == 4 else "TCP6"
        line = f"PROXY {v1_family} {_text(sip)} {_text(dip)} {sport} {dport}\r\n"
        return line.encode("ascii")
    family = _V2_AF_INET if sip.version == 4 else _V2_AF_INET6
    body = sip.packed + dip.packed + struct.pack("!HH", sport, dport)
    return b"".join(
        (
            V2_SIGNATURE,
            bytes(((_V2_VERSION << 4) | _V2_CMD_PROXY, (family << 4) | transport)),
            struct.pack("!H", len(body)),
            body,
        )
    )


def parse_header(data: bytes) -> tuple[str, tuple[str, int], tuple[str, int], int]:
    """Decode a PROXY header at the start of ``data``: ``(version, src, dst, consumed)``.

    ``consumed`` is the header length (v2 TLVs included and skipped).  Addresses come
    back as RFC 5952 text.  Raises ``ValueError`` on malformed or truncated input and on
    headers that carry no addresses (v1 ``UNKNOWN``, v2 ``LOCAL``, UNSPEC/UNIX families).
    """
    data = bytes(data)
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(b"PROXY "):
        return _parse_v1(data)
    raise ValueError("no PROXY protocol signature")


def _parse_v2(data: bytes) -> tuple[str, tuple[str, int], tuple[str, int], int]:
    if len(data) < _V2_FIXED:
        raise ValueError("truncated v2 header")
    ver_cmd, fam_proto = data[12], data[13]
    if ver_cmd >> 4 != _V2_VERSION:
        raise ValueError(f"v2 version nibble {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd == _V2_CMD_LOCAL:
        raise ValueError("v2 LOCAL command carries no addresses")
    if cmd != _V2_CMD_PROXY:
        raise ValueError(f"v2 command {cmd}")
    family, transport = fam_proto >> 4, fam_proto & 0x0F
    if transport not in _V2_TRANSPORT.values():
        raise ValueError(f"v2 transport {transport} carries no TCP/UDP addresses")
    addr_len = _V2_ADDR_LEN.get(family)
    if addr_len is None:
        raise ValueError(f"v2 address family {family} is not INET/INET6")
    (length,) = struct.unpack_from("!H", data, 14)
    if length < addr_len:
        raise ValueError(f"v2 length {length} < {addr_len} for family {family}")
    total = _V2_FIXED + length
    if len(data) < total:
        raise ValueError("truncated v2 header")
    size = 4 if family == _V2_AF_INET else 16
    src_raw = data[16 : 16 + size]
    dst_raw = data[16 + size : 16 + 2 * size]
    sport, dport = struct.unpack_from("!HH", data, 16 + 2 * size)
    src = ipaddress.ip_address(src_raw)
    dst = ipaddress.ip_address(dst_raw)
    return "v2", (_text(src), sport), (_text(dst), dport), total


def _parse_v1(data: bytes) -> tuple[str, tuple[str, int], tuple[str, int], int]:
    end = data.find(b"\r\n", 0, V1_MAX_LEN)
    if end < 0:
        raise ValueError(f"no CRLF within {V1_MAX_LEN} bytes of a v1 header")
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("v1 header is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        raise ValueError("v1 UNKNOWN carries no addresses")
    if len(parts) != 6:
        raise ValueError(f"v1 header has {len(parts)} fields, expected 6")
    _, family, s, d, sp, dp = parts
    cls: type[_IP]
    if family == "TCP4":
        cls = ipaddress.IPv4Address
    elif family == "TCP6":
        cls = ipaddress.IPv6Address
    else:
        raise ValueError(f"v1 protocol {family!r}")
    if "%" in s or "%" in d:
        raise ValueError("v1 addresses must not carry a zone")
    try:
        src, dst = cls(s), cls(d)
    except ValueError:
        raise ValueError(f"v1 addresses {s!r} {d!r} are not {family}") from None
    return "v1", (_text(src), _v1_port(sp)), (_text(dst), _v1_port(dp)), end + 2


def _v1_port(text: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ValueError(f"v1 port {text!r}")
    return int(text)
