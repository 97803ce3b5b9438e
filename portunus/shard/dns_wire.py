"""The bytes of DNS for the shard's stub resolver (portunus/shard/dns.py): a query,
the parse of an answer (CNAME chains, truncation, TTLs), and the two files a libc
resolver reads, /etc/hosts and resolv.conf.  Pure functions, so the parsers can be
property-tested without a socket."""

from __future__ import annotations

import ipaddress
import struct

TYPE_A = 1
TYPE_AAAA = 28
TYPE_CNAME = 5
_CLASS_IN = 1
RCODE_NXDOMAIN = 3
_MAX_NAMESERVERS = 3  # glibc's MAXNS: later lines are ignored by the libc too


class FormatError(ValueError):
    """A reply that is not a well-formed answer to our query."""


def parse_hosts(text: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``/etc/hosts`` → {lower-case name: (IPv4 addresses, IPv6 addresses)}."""
    table: dict[str, tuple[list[str], list[str]]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            addr = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        for name in fields[1:]:
            v4, v6 = table.setdefault(name.lower().rstrip("."), ([], []))
            family = v4 if addr.version == 4 else v6
            if str(addr) not in family:
                family.append(str(addr))
    return {k: (tuple(v4), tuple(v6)) for k, (v4, v6) in table.items()}


def parse_resolv_conf(text: str) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf as (address, 53); at most three."""
    servers: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            servers.append((fields[1], 53))
    return servers[:_MAX_NAMESERVERS]


def encode_query(qid: int, name: str, qtype: int) -> bytes:
    """A recursive query (RD set) for one name and type."""
    out = bytearray(struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0))
    for label in name.split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad label in {name!r}")
        out.append(len(raw))
        out += raw
    out += struct.pack("!BHH", 0, qtype, _CLASS_IN)
    if len(out) > 12 + 255 + 4:
        raise ValueError(f"name too long: {name!r}")
    return bytes(out)


def _read_name(buf: bytes, off: int) -> tuple[str, int]:
    """Decode a (possibly compressed) name; return it and the offset after it."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # bounds pointer loops
        if off >= len(buf):
            raise FormatError("name runs past the packet")
        length = buf[off]
        if length & 0xC0 == 0xC0:
            if off + 1 >= len(buf):
                raise FormatError("truncated pointer")
            if end < 0:
                end = off + 2
            off = ((length & 0x3F) << 8) | buf[off + 1]
            continue
        if length & 0xC0:
            raise FormatError("bad label type")
        if length == 0:
            return ".".join(labels).lower(), (end if end >= 0 else off + 1)
        labels.append(buf[off + 1 : off + 1 + length].decode("ascii", "replace"))
        off += 1 + length
    raise FormatError("compression loop")


def decode_answer(
    buf: bytes, qid: int, name: str, qtype: int
) -> tuple[int, bool, list[str], float]:
    """Parse a reply: (rcode, truncated, addresses, minimum TTL of the chain used).

    CNAME records in the answer section are followed from ``name``; the addresses
    are the ``qtype`` records of the last name in the chain.
    """
    try:
        rid, flags, qdcount, ancount, _ns, _ar = struct.unpack_from("!6H", buf)
        if rid != qid or not flags & 0x8000:
            raise FormatError("not a reply to our query")
        off = 12
        for _ in range(qdcount):
            qname, off = _read_name(buf, off)
            if qname != name:
                raise FormatError(f"reply for another name: {qname!r}")
            off += 4
        if flags & 0x0200:
            return flags & 0xF, True, [], 0.0
        cnames: dict[str, tuple[str, int]] = {}
        found: list[tuple[str, str, int]] = []
        for _ in range(ancount):
            owner, off = _read_name(buf, off)
            rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", buf, off)
            off += 10
            if off + rdlen > len(buf):
                raise FormatError("record runs past the packet")
            if rclass == _CLASS_IN and rtype == TYPE_CNAME:
                cnames[owner] = (_read_name(buf, off)[0], ttl)
            elif rclass == _CLASS_IN and rtype == qtype and rdlen in (4, 16):
                found.append((owner, str(ipaddress.ip_address(buf[off : off + rdlen])), ttl))
            off += rdlen
    except (struct.error, IndexError) as exc:
        raise FormatError(str(exc)) from exc
    current, ttl_min, seen = name, float("inf"), {name}
    while current in cnames:
        current, ttl = cnames[current]
        ttl_min = min(ttl_min, ttl)
        if current in seen:
            break
        seen.add(current)
    addrs = [a for owner, a, _ in found if owner == current]
    ttls = [t for owner, _, t in found if owner == current]
    return flags & 0xF, False, addrs, min([ttl_min, *ttls])
