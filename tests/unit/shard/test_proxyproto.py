"""PROXY protocol header encoding against hand-written spec vectors and round trips."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portunus.shard.proxyproto import V1_MAX_LEN, V2_SIGNATURE, build_header, parse_header

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")

# ---------------------------------------------------------------- known vectors


def test_signature_is_the_spec_constant() -> None:
    assert V2_SIGNATURE == SIG


def test_v2_ipv4_tcp_vector() -> None:
    # 192.0.2.1:56324 -> 198.51.100.7:443, written out field by field from section 2.2.
    expected = (
        SIG
        + b"\x21"  # version 2, command PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 address bytes follow
        + b"\xc0\x00\x02\x01"  # 192.0.2.1
        + b"\xc6\x33\x64\x07"  # 198.51.100.7
        + b"\xdc\x04"  # 56324
        + b"\x01\xbb"  # 443
    )
    header = build_header("v2", ("192.0.2.1", 56324), ("198.51.100.7", 443))
    assert header == expected
    assert len(header) == 28
    assert parse_header(header + b"payload") == (
        "v2",
        ("192.0.2.1", 56324),
        ("198.51.100.7", 443),
        28,
    )


def test_v2_ipv6_udp_vector() -> None:
    expected = (
        SIG
        + b"\x21"
        + b"\x22"  # AF_INET6, DGRAM
        + b"\x00\x24"  # 36
        + bytes.fromhex("20010db8 00000000 00000000 00000001")  # 2001:db8::1
        + bytes.fromhex("20010db8 00000000 00000000 00000002")  # 2001:db8::2
        + b"\x04\xd2"  # 1234
        + b"\x00\x35"  # 53
    )
    header = build_header("v2", ("2001:db8::1", 1234), ("2001:db8::2", 53), "udp")
    assert header == expected
    assert len(header) == 52


def test_v2_udp_ipv4_and_tcp_ipv6_family_bytes() -> None:
    assert build_header("v2", ("10.0.0.1", 1), ("10.0.0.2", 2), "udp")[12:14] == b"\x21\x12"
    assert build_header("v2", ("::1", 1), ("::2", 2))[12:14] == b"\x21\x21"


def test_v1_vectors() -> None:
    assert (
        build_header("v1", ("192.0.2.1", 56324), ("198.51.100.7", 443))
        == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    )
    assert (
        build_header("v1", ("2001:DB8:0:0::1", 0), ("::1", 65535))
        == b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"
    )


def test_v1_longest_line_fits_the_spec_bound() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = build_header("v1", (full, 65535), (full, 65535))
    assert len(header) == 104 <= V1_MAX_LEN
    assert parse_header(header)[3] == 104


# ---------------------------------------------------------------- normalization


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ipv4_mapped_pair_is_presented_as_ipv4(version: str) -> None:
    header = build_header(version, ("::ffff:192.0.2.1", 5000), ("::FFFF:c633:6407", 80))
    if version == "v1":
        assert header == b"PROXY TCP4 192.0.2.1 198.51.100.7 5000 80\r\n"
    else:
        assert header[13] == 0x11 and len(header) == 28
    assert parse_header(header)[1:3] == (("192.0.2.1", 5000), ("198.51.100.7", 80))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mixed_families_promote_ipv4_to_mapped(version: str) -> None:
    header = build_header(version, ("192.0.2.1", 5000), ("2001:db8::7", 443))
    if version == "v1":
        assert header == b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::7 5000 443\r\n"
    else:
        assert header[13] == 0x21
        assert header[16:32] == b"\x00" * 10 + b"\xff\xff\xc0\x00\x02\x01"
    assert parse_header(header)[1:3] == (("::ffff:192.0.2.1", 5000), ("2001:db8::7", 443))
    # the same the other way round
    back = build_header(version, ("2001:db8::7", 443), ("::ffff:192.0.2.1", 5000))
    assert parse_header(back)[1:3] == (("2001:db8::7", 443), ("::ffff:192.0.2.1", 5000))


def test_zone_is_dropped_and_sockaddr_4_tuples_accepted() -> None:
    header = build_header("v1", ("fe80::1%lo", 1, 0, 1), ("fe80::2", 2, 0, 0))
    assert header == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


# ---------------------------------------------------------------- build errors


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("v1", ("10.0.0.1", 1), ("10.0.0.2", 2)), {"protocol": "udp"}),
        (("v3", ("10.0.0.1", 1), ("10.0.0.2", 2)), {}),
        (("v2", ("10.0.0.1", 1), ("10.0.0.2", 2)), {"protocol": "sctp"}),
        (("v2", ("example.com", 1), ("10.0.0.2", 2)), {}),
        (("v2", ("10.0.0.1", 65536), ("10.0.0.2", 2)), {}),
        (("v2", ("10.0.0.1", -1), ("10.0.0.2", 2)), {}),
        (("v2", ("10.0.0.1", "80"), ("10.0.0.2", 2)), {}),
        (("v2", ("10.0.0.1", True), ("10.0.0.2", 2)), {}),
        (("v2", (b"10.0.0.1", 1), ("10.0.0.2", 2)), {}),
        (("v1", ("010.0.0.1", 1), ("10.0.0.2", 2)), {}),
    ],
)
def test_build_rejects(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_header(*args, **kwargs)


# ---------------------------------------------------------------- parse errors

_GOOD_V2 = build_header("v2", ("192.0.2.1", 1), ("192.0.2.2", 2))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GET / HTTP/1.1\r\n",
        SIG,
        _GOOD_V2[:-1],
        _GOOD_V2[:12] + b"\x11" + _GOOD_V2[13:],  # version 1 nibble
        _GOOD_V2[:12] + b"\x20" + _GOOD_V2[13:],  # LOCAL
        _GOOD_V2[:12] + b"\x22" + _GOOD_V2[13:],  # unknown command
        _GOOD_V2[:13] + b"\x10" + _GOOD_V2[14:],  # UNSPEC transport
        _GOOD_V2[:13] + b"\x31" + _GOOD_V2[14:],  # AF_UNIX
        _GOOD_V2[:13] + b"\x01" + _GOOD_V2[14:],  # AF_UNSPEC
        _GOOD_V2[:13] + b"\x21" + _GOOD_V2[14:],  # INET6 but 12 address bytes
        _GOOD_V2[:14] + b"\x00\x0b" + _GOOD_V2[16:],  # length too short for INET
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",  # no CRLF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f:: ffff:f:: 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 ::1 ::2 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 80 + b"\r\n",  # CRLF past 107 bytes
        b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_header(data)


def test_parse_v2_skips_tlvs() -> None:
    tlv = b"\x04\x00\x02ab"  # PP2_TYPE_NOOP with 2 bytes
    header = SIG + b"\x21\x11" + (12 + len(tlv)).to_bytes(2, "big") + _GOOD_V2[16:] + tlv
    assert parse_header(header + b"data") == ("v2", ("192.0.2.1", 1), ("192.0.2.2", 2), 33)


# ---------------------------------------------------------------- hypothesis round trip

ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)
any_ip = st.one_of(ipv4s, ipv6s, ipv4s.map(lambda ip: ipaddress.IPv6Address(f"::ffff:{ip}")))
ports = st.integers(0, 65535)


def _expected_pair(
    a: ipaddress.IPv4Address | ipaddress.IPv6Address,
    b: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]:
    """Oracle: unmap, then map the IPv4 side into IPv6 if the families still differ."""

    def unmap(ip: ipaddress._BaseAddress) -> ipaddress._BaseAddress:
        mapped = getattr(ip, "ipv4_mapped", None)
        return mapped if mapped is not None else ip

    def to6(ip: ipaddress._BaseAddress) -> ipaddress._BaseAddress:
        return ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")

    a, b = unmap(a), unmap(b)
    if a.version != b.version:
        a, b = to6(a), to6(b)
    return a, b


@settings(max_examples=400)
@given(
    version=st.sampled_from(["v1", "v2"]),
    protocol=st.sampled_from(["tcp", "udp"]),
    src=any_ip,
    dst=any_ip,
    sport=ports,
    dport=ports,
    payload=st.binary(max_size=64),
)
def test_round_trip(
    version: str,
    protocol: str,
    src: ipaddress._BaseAddress,
    dst: ipaddress._BaseAddress,
    sport: int,
    dport: int,
    payload: bytes,
) -> None:
    if version == "v1" and protocol == "udp":
        with pytest.raises(ValueError):
            build_header(version, (str(src), sport), (dst.compressed, dport), protocol)
        return
    header = build_header(version, (str(src), sport), (dst.exploded, dport), protocol)
    got_version, (gsrc, gsport), (gdst, gdport), consumed = parse_header(header + payload)
    assert got_version == version
    assert consumed == len(header)
    assert (gsport, gdport) == (sport, dport)
    want_src, want_dst = _expected_pair(src, dst)
    assert ipaddress.ip_address(gsrc) == want_src
    assert ipaddress.ip_address(gdst) == want_dst
    if version == "v2":
        family = 0x1 if want_src.version == 4 else 0x2
        assert header[13] == (family << 4) | (0x1 if protocol == "tcp" else 0x2)
        assert int.from_bytes(header[14:16], "big") == len(header) - 16
    else:
        assert header.endswith(b"\r\n") and len(header) <= V1_MAX_LEN


@settings(max_examples=500)
@given(st.binary(max_size=120), st.sampled_from([b"", SIG, b"PROXY ", b"PROXY TCP4 "]))
def test_parse_random_bytes_only_value_error(data: bytes, prefix: bytes) -> None:
    try:
        version, src, dst, consumed = parse_header(prefix + data)
    except ValueError:
        return
    assert version in ("v1", "v2")
    assert 0 < consumed <= len(prefix + data)
    ipaddress.ip_address(src[0])
    ipaddress.ip_address(dst[0])
