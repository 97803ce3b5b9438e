"""ClientHello peeking against real OpenSSL hellos, hand-built edge cases and fuzz."""

from __future__ import annotations

import functools
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portunus.shard.sni import MAX_CLIENT_HELLO, ClientHelloError, SniTable, extract_sni

# ---------------------------------------------------------------- helpers


@functools.cache
def _client_context(max_version: ssl.TLSVersion | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # lets server_hostname be None or an IP literal
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def real_hello(
    server_hostname: str | None,
    *,
    max_version: ssl.TLSVersion | None = None,
    alpn: list[str] | None = None,
) -> bytes:
    """The exact bytes OpenSSL sends first as a client (one flight, no server needed)."""
    if alpn is None:
        ctx = _client_context(max_version)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16"
    return data


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def record(payload: bytes, ctype: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([ctype]) + version + u16(len(payload)) + payload


def handshake_bytes(data: bytes) -> bytes:
    """Concatenated handshake-record payloads of a record stream."""
    out, p = bytearray(), 0
    while p < len(data):
        assert data[p] == 22
        n = int.from_bytes(data[p + 3 : p + 5], "big")
        out += data[p + 5 : p + 5 + n]
        p += 5 + n
    return bytes(out)


def refragment(hs: bytes, sizes: list[int]) -> bytes:
    """Re-wrap handshake bytes into records of the given payload sizes (last takes the rest)."""
    out, p = bytearray(), 0
    for size in sizes:
        if p >= len(hs):
            break
        out += record(hs[p : p + size])
        p += size
    if p < len(hs):
        out += record(hs[p:])
    return bytes(out)


def ext(etype: int, data: bytes) -> bytes:
    return u16(etype) + u16(len(data)) + data


def sni_ext(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(bytes([t]) + u16(len(n)) + n for t, n in entries)
    return ext(0, u16(len(names)) + names)


def hello_body(extensions: bytes | None, *, sid: bytes = b"", suites: bytes = b"\x13\x01") -> bytes:
    body = b"\x03\x03" + bytes(32) + bytes([len(sid)]) + sid + u16(len(suites)) + suites
    body += b"\x01\x00"
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def crafted(extensions: bytes | None, **kw: bytes) -> bytes:
    return record(handshake(hello_body(extensions, **kw)))


def outcome(buf: bytes, max_size: int = MAX_CLIENT_HELLO) -> tuple[bool, str | None] | str:
    """extract_sni's result, or the reason of its ClientHelloError; anything else escapes."""
    try:
        result = extract_sni(buf, max_size)
    except ClientHelloError as exc:
        assert exc.reason in {
            "not_tls",
            "not_handshake",
            "not_client_hello",
            "oversize",
            "malformed",
        }
        return exc.reason
    done, name = result
    assert isinstance(done, bool)
    if not done:
        assert name is None
    assert name is None or (isinstance(name, str) and name == name.lower() and name)
    return result


hostname_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
# The last label starts with a letter so OpenSSL never mistakes the name for an IP literal.
hostname_tld = st.from_regex(r"[a-zA-Z][a-zA-Z0-9]{0,10}", fullmatch=True)
hostnames = st.builds(
    lambda labels, tld: ".".join([*labels, tld]), st.lists(hostname_label, max_size=4), hostname_tld
)

# ---------------------------------------------------------------- real hellos


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("api.example.com", "api.example.com"),
        ("API.Example.COM", "api.example.com"),
        ("example.com.", "example.com"),
        ("localhost", "localhost"),
        ("a-b.c-d.example", "a-b.c-d.example"),
    ],
)
@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2])
def test_real_hello_yields_normalized_name(
    sent: str, expected: str, max_version: ssl.TLSVersion | None
) -> None:
    data = real_hello(sent, max_version=max_version)
    assert sent.encode() in data  # OpenSSL sent it as given; normalizing is our job
    assert extract_sni(data) == (True, expected)
    assert extract_sni(bytearray(data)) == (True, expected)
    assert extract_sni(memoryview(data)) == (True, expected)


@pytest.mark.parametrize("server_hostname", [None, "127.0.0.1", "::1"])
def test_hello_without_sni(server_hostname: str | None) -> None:
    data = real_hello(server_hostname)
    if server_hostname is not None:
        assert server_hostname.encode() not in data
    assert extract_sni(data) == (True, None)


@settings(max_examples=150, deadline=None)
@given(name=hostnames)
def test_real_hello_hypothesis_names(name: str) -> None:
    assert extract_sni(real_hello(name)) == (True, name.lower())


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("server_hostname", ["www.example.org", None])
def test_every_truncation_needs_more_bytes(
    server_hostname: str | None, max_version: ssl.TLSVersion | None
) -> None:
    data = real_hello(server_hostname, max_version=max_version)
    for cut in range(len(data)):
        assert outcome(data[:cut]) == (False, None), cut
    assert outcome(data) == (True, server_hostname)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=hostnames,
    tls12=st.booleans(),
    record_sizes=st.lists(st.integers(1, 200), min_size=1, max_size=40),
    segment_sizes=st.lists(st.integers(1, 300), min_size=1, max_size=40),
)
def test_refragmented_hello_over_many_segments(
    name: str, tls12: bool, record_sizes: list[int], segment_sizes: list[int]
) -> None:
    original = real_hello(name, max_version=ssl.TLSVersion.TLSv1_2 if tls12 else None)
    wire = refragment(handshake_bytes(original), record_sizes)
    assert handshake_bytes(wire) == handshake_bytes(original)
    received = 0
    for size in segment_sizes * (len(wire) // sum(segment_sizes) + 1):
        received = min(received + size, len(wire))
        if received == len(wire):
            break
        assert extract_sni(wire[:received]) == (False, None)
    assert extract_sni(wire) == (True, name.lower())


def test_real_hello_split_by_openssl_across_records() -> None:
    # ~20 KiB of ALPN makes OpenSSL itself fragment the ClientHello into two records.
    data = real_hello("big.example.com", alpn=[f"{'p' * 200}{i}" for i in range(100)])
    first_len = int.from_bytes(data[3:5], "big")
    assert len(data) > 5 + first_len  # really more than one record
    assert extract_sni(data, max_size=65536) == (True, "big.example.com")
    assert extract_sni(data[: len(data) - 1], max_size=65536) == (False, None)
    with pytest.raises(ClientHelloError) as info:
        extract_sni(data[:100])  # the declared length alone exceeds the default bound
    assert info.value.reason == "oversize"


def test_bytes_after_the_hello_are_ignored() -> None:
    data = real_hello("api.example.com")
    ccs = record(b"\x01", ctype=20, version=b"\x03\x03")
    early = record(b"\x00" * 50, ctype=23, version=b"\x03\x03")
    assert extract_sni(data + ccs + early) == (True, "api.example.com")
    assert extract_sni(data + b"\xff" * 3) == (True, "api.example.com")


def test_oversize_bound() -> None:
    data = real_hello("api.example.com")
    assert extract_sni(data, max_size=len(data)) == (True, "api.example.com")
    with pytest.raises(ClientHelloError) as info:
        extract_sni(data[:10], max_size=len(data) - 1)
    assert info.value.reason == "oversize"
    # One byte per record: the declared length fits, but the records do not.
    slow = refragment(handshake_bytes(data), [1] * 600)
    bound = 1000
    assert extract_sni(slow[: bound - 1], max_size=bound) == (False, None)
    for cut in (bound, bound + 1, len(slow)):
        with pytest.raises(ClientHelloError) as info:
            extract_sni(slow[:cut], max_size=bound)
        assert info.value.reason == "oversize"
    assert extract_sni(slow, max_size=len(slow)) == (True, "api.example.com")


def test_declared_length_beyond_bound_fails_early() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff"
    assert outcome(header) == "oversize"


def test_caller_bytearray_stays_resizable() -> None:
    buf = bytearray(b"\x16\x03\x01")
    assert extract_sni(buf) == (False, None)
    buf += b"\x00\x00"  # would raise BufferError if a view were still exported
    with pytest.raises(ClientHelloError):
        extract_sni(buf)
    buf += b"x"
    assert len(buf) == 6


# ---------------------------------------------------------------- hand-built hellos

_NO_SNI_EXTS = ext(10, b"\x00\x02\x00\x1d") + ext(43, b"\x02\x03\x04")


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (crafted(None), (True, None)),  # pre-extension client
        (crafted(b""), (True, None)),
        (crafted(_NO_SNI_EXTS), (True, None)),
        (crafted(sni_ext((0, b"Host.Example.")) + _NO_SNI_EXTS), (True, "host.example")),
        (crafted(_NO_SNI_EXTS + sni_ext((7, b"opaque"))), (True, None)),
        (crafted(sni_ext((7, b"opaque"), (0, b"h.example"))), (True, "h.example")),
        (crafted(sni_ext((0, b"h.example")), sid=bytes(32)), (True, "h.example")),
        (b"\x16", (False, None)),
        (b"\x16\x03", (False, None)),
        (b"\x16\x03\x01\x00", (False, None)),
        (b"\x16\x03\x01\x00\x30", (False, None)),
        (b"\x16\x03\x01\x00\x30\x01", (False, None)),
    ],
)
def test_crafted_valid(wire: bytes, expected: tuple[bool, str | None]) -> None:
    assert outcome(wire) == expected


def _two_records_second_is(ctype: int, version: bytes = b"\x03\x01") -> bytes:
    hs = handshake(hello_body(sni_ext((0, b"a.example"))))
    return record(hs[:10]) + record(hs[10:], ctype=ctype, version=version)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_tls"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not_tls"),
        (b"\x80\x2e\x01\x00\x02\x00\x15", "not_tls"),  # SSLv2-compatible hello
        (b"\x16\x02", "not_tls"),
        (b"\x16\x04\x01\x00\x05", "not_tls"),
        (record(b"\x01", ctype=20), "not_tls"),
        (_two_records_second_is(21), "not_handshake"),
        (_two_records_second_is(23), "not_handshake"),
        (_two_records_second_is(22, version=b"\x02\x00"), "malformed"),
        (b"\x16\x03\x01\x00\x00", "malformed"),
        (b"\x16\x03\x01\x40\x01", "malformed"),  # record longer than 2^14
        (b"\x16\x03\x01\x00\x30\x02", "not_client_hello"),
        (record(handshake(b"\x00" * 10, msg_type=2)), "not_client_hello"),
        (record(handshake(b"\x03\x03" + bytes(30))), "malformed"),
        (record(handshake(b"\x02\x00" + hello_body(None)[2:])), "malformed"),
        (crafted(None, sid=bytes(33)), "malformed"),
        (crafted(None, suites=b"\x13"), "malformed"),
        (crafted(None, suites=b""), "malformed"),
        (record(handshake(hello_body(None)[:-2] + b"\x00")), "malformed"),
        (record(handshake(hello_body(None) + b"\x00")), "malformed"),
        (record(handshake(hello_body(None) + b"\x00\x05\x00")), "malformed"),
        (record(handshake(hello_body(None) + b"\x00\x04\x00\x00\x00\x09")), "malformed"),
        (record(handshake(hello_body(b"") + ext(0xFF01, b""))), "malformed"),  # past block
        (crafted(_NO_SNI_EXTS + ext(10, b"\x00\x00")), "malformed"),  # duplicate
        (crafted(ext(0, b"")), "malformed"),
        (crafted(ext(0, b"\x00\x09\x00\x00\x03abc")), "malformed"),  # list length
        (crafted(ext(0, b"\x00\x06\x00\x00\x09abc")), "malformed"),  # name overruns
        (crafted(sni_ext((0, b"a.example"), (0, b"b.example"))), "malformed"),
        (crafted(sni_ext((0, b""))), "malformed"),
        (crafted(sni_ext((0, b"."))), "malformed"),
        (crafted(sni_ext((0, b"a\x00.example"))), "malformed"),
        (crafted(sni_ext((0, b"a b.example"))), "malformed"),
        (crafted(sni_ext((0, "bücher.example".encode()))), "malformed"),
    ],
)
def test_crafted_invalid(wire: bytes, reason: str) -> None:
    assert outcome(wire) == reason


def test_error_carries_reason_and_detail() -> None:
    with pytest.raises(ClientHelloError) as info:
        extract_sni(b"GET /")
    assert info.value.reason == "not_tls"
    assert str(info.value).startswith("not_tls: ")


# ---------------------------------------------------------------- fuzz


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_client_hello_error(data: bytes) -> None:
    outcome(data)
    outcome(data, max_size=64)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03\x02\x00\x01"]))
def test_random_bytes_behind_tls_prefix(data: bytes, prefix: bytes) -> None:
    outcome(prefix + data)


_SEED_HELLOS = [
    real_hello("fuzz.example.com"),
    real_hello(None, max_version=ssl.TLSVersion.TLSv1_2),
]


@settings(max_examples=500, deadline=None)
@given(
    seed=st.sampled_from(_SEED_HELLOS),
    edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 600),
)
def test_mutated_real_hellos(seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    outcome(bytes(data))
    outcome(bytes(data[:cut]))


# ---------------------------------------------------------------- SniTable


def _table() -> SniTable:
    return SniTable(
        [
            ("api.example.com", "r-exact"),
            ("*.example.com", "r-wild"),
            (None, "r-fallback"),
            ("*.Other.Test.", "r-wild2"),
            ("WWW.Other.Test", "r-exact2"),
        ]
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("api.example.com", ("r-exact", "exact")),
        ("API.EXAMPLE.COM.", ("r-exact", "exact")),
        ("web.example.com", ("r-wild", "wildcard")),
        ("Web.Example.Com", ("r-wild", "wildcard")),
        ("a.b.example.com", ("r-fallback", "fallback")),  # two labels: not single-label
        ("example.com", ("r-fallback", "fallback")),
        (".example.com", ("r-fallback", "fallback")),
        ("xexample.com", ("r-fallback", "fallback")),
        ("www.other.test", ("r-exact2", "exact")),
        ("ftp.other.test", ("r-wild2", "wildcard")),
        ("unrelated.net", ("r-fallback", "fallback")),
        (None, ("r-fallback", "fallback")),
    ],
)
def test_table_precedence(name: str | None, expected: tuple[str, str]) -> None:
    assert _table().match(name) == expected


def test_table_without_fallback() -> None:
    table = SniTable([("api.example.com", "a"), ("*.example.com", "w")])
    assert table.match(None) is None
    assert table.match("example.com") is None
    assert table.match("a.b.example.com") is None
    assert table.match("x.example.com") == ("w", "wildcard")
    assert len(table) == 2
    assert SniTable([]).match("anything") is None


def test_table_only_fallback() -> None:
    table = SniTable([(None, "fb")])
    assert table.match("api.example.com") == ("fb", "fallback")
    assert table.match(None) == ("fb", "fallback")


@pytest.mark.parametrize(
    "entries",
    [
        [(None, "a"), (None, "b")],
        [("api.example.com", "a"), ("API.example.com.", "b")],
        [("*.example.com", "a"), ("*.EXAMPLE.com", "b")],
        [("*", "a")],
        [("*.", "a")],
        [("a.*.com", "a")],
        [("*.*.com", "a")],
        [("", "a")],
    ],
)
def test_table_rejects_bad_entries(entries: list[tuple[str | None, str]]) -> None:
    with pytest.raises(ValueError):
        SniTable(entries)


@settings(max_examples=200)
@given(
    labels=st.lists(hostname_label, min_size=1, max_size=4),
    extra=st.lists(hostname_label, max_size=3),
)
def test_wildcard_matches_exactly_one_extra_label(labels: list[str], extra: list[str]) -> None:
    domain = ".".join(labels)
    table = SniTable([(f"*.{domain}", "w")])
    name = ".".join([*extra, domain])
    expected = ("w", "wildcard") if len(extra) == 1 else None
    assert table.match(name) == expected
    assert table.match(name.upper()) == expected
