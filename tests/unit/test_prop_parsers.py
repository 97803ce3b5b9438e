"""Properties of every parser that reads bytes or text from outside: it returns a
value or raises its own documented error, never anything else (no IndexError,
struct.error, RecursionError, OverflowError…), whatever the input.

Covered: the TLS ClientHello peek (``shard.sni``), the PROXY header codec
(``shard.proxyproto``), untrusted JSON (``safejson``), edge-link frames
(``ipc.edge_wire``), control-socket requests (``control.rpc.protocol``) and the two
TOML loaders (standalone and server.toml).
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from portunus import safejson
from portunus.config import ConfigError, load_server_settings, load_standalone
from portunus.control.rpc.protocol import Request, RequestError, parse_request
from portunus.ipc.edge_wire import WireError, read_frame
from portunus.shard import proxyproto
from portunus.shard.sni import ClientHelloError, extract_sni

# ------------------------------------------------------------------ ClientHello


def _record(body: bytes, ctype: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([ctype]) + version + struct.pack("!H", len(body)) + body


hello_like = st.one_of(
    st.binary(max_size=600),
    # A handshake record header followed by random bytes: reaches the inner parser.
    st.binary(max_size=600).map(lambda b: _record(b"\x01" + struct.pack("!I", len(b))[1:] + b)),
    st.tuples(st.integers(0, 2**16 - 1), st.binary(max_size=300)).map(
        lambda t: _record(b"\x01" + struct.pack("!I", t[0])[1:] + t[1])
    ),
)


@given(data=hello_like, max_size=st.integers(1, 20000))
def test_client_hello_parser_returns_or_raises_its_error(data: bytes, max_size: int) -> None:
    for cut in {len(data), len(data) // 2, len(data) // 3}:
        try:
            done, name = extract_sni(data[:cut], max_size)
        except ClientHelloError as exc:
            assert exc.reason in {
                "not_tls",
                "not_handshake",
                "not_client_hello",
                "oversize",
                "malformed",
            }
        else:
            assert isinstance(done, bool)
            assert name is None or (isinstance(name, str) and len(name) <= 255)


# ------------------------------------------------------------------ PROXY header

proxy_like = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: proxyproto.V2_SIGNATURE + b),
    st.text(max_size=120).map(lambda t: b"PROXY " + t.encode("utf-8", "surrogatepass")),
    st.tuples(
        st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "UDP4", "tcp4"]),
        st.text(max_size=45),
        st.text(max_size=45),
        st.text(max_size=8),
        st.text(max_size=8),
    ).map(lambda t: ("PROXY " + " ".join(t) + "\r\n").encode("utf-8", "surrogatepass")),
)


@given(data=proxy_like)
def test_proxy_header_parser_returns_or_raises_value_error(data: bytes) -> None:
    try:
        version, src, dst, consumed = proxyproto.parse_header(data)
    except ValueError:
        return
    assert version in ("v1", "v2")
    assert 0 < consumed <= len(data)
    for host, port in (src, dst):
        assert isinstance(host, str) and 0 <= port <= 65535


@given(
    version=st.one_of(st.sampled_from(["v1", "v2"]), st.text(max_size=3)),
    protocol=st.one_of(st.sampled_from(["tcp", "udp"]), st.text(max_size=3)),
    src=st.tuples(
        st.one_of(st.ip_addresses().map(str), st.text(max_size=20)),
        st.one_of(st.integers(-5, 70000), st.floats(), st.none()),
    ),
    dst=st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)),
)
def test_proxy_header_builder_round_trips_or_refuses(
    version: str, protocol: str, src: Any, dst: Any
) -> None:
    try:
        header = proxyproto.build_header(version, protocol, src, dst)
    except ValueError:
        return
    got_version, got_src, got_dst, consumed = proxyproto.parse_header(header + b"payload")
    assert (got_version, consumed) == (version, len(header))
    assert got_src[1] == src[1] and got_dst[1] == dst[1]


# ------------------------------------------------------------------ JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=30,
)


def _depth(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max((_depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    return 0


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    return True


@given(doc=json_values)
def test_safejson_accepts_exactly_finite_shallow_json(doc: Any) -> None:
    text = json.dumps(doc)
    try:
        got = safejson.loads(text)
    except safejson.JsonRejected:
        assert not _finite(doc) or _depth(doc) > 32
    else:
        assert _finite(doc) and _depth(doc) <= 32
        assert got == doc


@given(
    depth=st.integers(0, 200),
    noise=st.text(alphabet='[]{}",:\\ 1a', max_size=60),
    wrap=st.sampled_from(["[%s]", '{"k":%s}', '"%s"', "%s"]),
)
@example(depth=33, noise="", wrap="%s")
def test_safejson_depth_bound_is_exact_and_never_recurses(
    depth: int, noise: str, wrap: str
) -> None:
    text = wrap % ("[" * depth + noise + "]" * depth)
    try:
        doc = safejson.loads(text)
    except safejson.JsonRejected:
        return
    assert _depth(doc) <= 32
    assert doc == json.loads(text)


@given(raw=st.binary(max_size=300))
def test_safejson_on_bytes_raises_only_its_error(raw: bytes) -> None:
    try:
        safejson.loads(raw)
    except safejson.JsonRejected:
        pass


# ------------------------------------------------------------------ edge-link frames


def _read(stream: bytes) -> Any:
    async def go() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        reader.feed_eof()
        return await read_frame(reader)

    return asyncio.run(go())


frames = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: struct.pack(">I", len(b)) + b),
    json_values.map(lambda v: json.dumps(v).encode()).map(lambda b: struct.pack(">I", len(b)) + b),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n) + b"{}"),
)


@given(stream=frames)
def test_edge_frames_parse_or_raise_wire_errors(stream: bytes) -> None:
    try:
        msg = _read(stream)
    except (WireError, asyncio.IncompleteReadError):
        return
    assert isinstance(msg, dict) and isinstance(msg["type"], str)


# ------------------------------------------------------------------ control socket


@given(
    line=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "id": json_values,
                "method": json_values,
                "token": json_values,
                "params": json_values,
            },
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_control_requests_parse_or_raise_request_errors(line: bytes) -> None:
    try:
        req = parse_request(line)
    except RequestError as exc:
        assert exc.code == "bad_request"
        return
    assert isinstance(req, Request) and isinstance(req.method, str) and isinstance(req.params, dict)


# ------------------------------------------------------------------ TOML loaders


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf / nan are valid TOML floats
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + " }"


toml_values = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["8080", "10.0.0.1:80", "1-10", "*.example.com", "tcp", "udp", "v1", "json"]),
    lambda c: (
        st.lists(c, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), c, max_size=3)
    ),
    max_leaves=10,
)
SETTING_KEYS = [
    "shutdown_drain_timeout_secs",
    "udp_flow_idle_secs",
    "udp_max_flows",
    "connect_timeout_secs",
    "range_rule_max_ports",
    "log_format",
    "listen_address",
    "metrics_listen",
    "shards",
    "bogus",
]
RULE_KEYS = [
    "name",
    "protocol",
    "listen_port",
    "listen_ports",
    "target",
    "targets",
    "sni",
    "proxy_protocol",
    "prefer_ipv6",
    "rate_limit",
    "health_check_interval_secs",
    "extra",
]
top = st.dictionaries(st.sampled_from(SETTING_KEYS), toml_values, max_size=4)
rules = st.lists(st.dictionaries(st.sampled_from(RULE_KEYS), toml_values, max_size=7), max_size=3)


def _document(settings: dict[str, Any], tables: list[dict[str, Any]]) -> str:
    lines = [f"{k} = {_toml(v)}" for k, v in settings.items()]
    for t in tables:
        lines += ["", "[[rule]]"] + [f"{k} = {_toml(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def _expect_config_errors(path: Path, exc: ConfigError) -> None:
    assert exc.errors
    lines = []
    for err in exc.errors:
        assert err.startswith(f"{path}:"), err
        lines.append(int(err[len(str(path)) + 1 :].split(":", 1)[0]))
        assert len(err) < 2000
    assert lines == sorted(lines)


@given(settings=top, tables=rules, junk=st.one_of(st.just(""), st.text(max_size=40)))
def test_standalone_loader_returns_or_lists_errors(
    tmp_path_factory: Any, settings: dict[str, Any], tables: list[dict[str, Any]], junk: str
) -> None:
    path = tmp_path_factory.mktemp("toml") / "forward.toml"
    path.write_text(_document(settings, tables) + junk, encoding="utf-8", errors="surrogatepass")
    try:
        loaded, got = load_standalone(str(path))
    except ConfigError as exc:
        _expect_config_errors(path, exc)
        return
    for key in ("shutdown_drain_timeout_secs", "udp_flow_idle_secs", "connect_timeout_secs"):
        assert math.isfinite(getattr(loaded, key))
    for rule in got:
        assert (
            math.isfinite(rule.health_check_interval_secs)
            and 0.1 <= rule.health_check_interval_secs <= 3600
        )


@given(settings=top)
def test_server_toml_loader_returns_or_lists_errors(
    tmp_path_factory: Any, settings: dict[str, Any]
) -> None:
    data_dir = tmp_path_factory.mktemp("srv")
    path = data_dir / "server.toml"
    path.write_text(
        _document({k: v for k, v in settings.items() if k != "shards"}, []),
        encoding="utf-8",
        errors="surrogatepass",
    )
    try:
        loaded = load_server_settings(str(data_dir), None)
    except ConfigError as exc:
        _expect_config_errors(path, exc)
        return
    assert (
        math.isfinite(loaded.shutdown_drain_timeout_secs)
        and 0 <= loaded.shutdown_drain_timeout_secs <= 3600
    )
