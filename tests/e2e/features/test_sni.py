"""TLS SNI routing with real TLS clients and origins: exact > wildcard > fallback,
no-match and non-TLS closes with their metrics, ClientHellos split across TCP
segments and TLS records, the peek timeout — standalone TOML (``sni = ...``) and
the server (``--sni``, ``sni_pattern``) with its conflict and validation codes.

Each origin terminates TLS with a certificate only it holds (signed by a test
CA), and the clients verify it: a completed handshake with hostname checking is
proof the right origin got the connection.  The origin also echoes the SNI it
received, so the replayed ClientHello is checked from the far side too.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.features.helpers import ServerFactory, ServerProc, port_reporter, reached_port
from tests.e2e.features.nginx_origin import NginxProxyOrigin, require_nginx
from tests.e2e.features.tls import (
    Pki,
    split_into_records,
    tls_origin_handler,
    tls_visit,
    tls_visit_reshaped,
)
from tests.e2e.support import (
    LOOPBACK,
    STANDALONE_BIN,
    Metrics,
    Origin,
    PortAllocator,
    StandaloneFactory,
    StandaloneProc,
    standalone_toml,
    wait_for,
)

EXACT, WILD = "api.example.test", "*.example.test"
FALLBACK_NAMES = ["fallback.test", "other.test", "deep.sub.example.test", "example.test"]


@dataclass
class Origins:
    pki: Pki
    exact: Origin
    wild: Origin
    fallback: Origin

    def by_label(self) -> dict[str, Origin]:
        return {"exact": self.exact, "wild": self.wild, "fallback": self.fallback}


@pytest.fixture(scope="module")
def tls_origins(
    tmp_path_factory: pytest.TempPathFactory, origin_module: Callable[..., Origin]
) -> Origins:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    made = {}
    for label, names in (("exact", [EXACT]), ("wild", [WILD]), ("fallback", FALLBACK_NAMES)):
        cert, key = pki.leaf(label, names)
        made[label] = origin_module(tls_origin_handler(label, cert, key))
    return Origins(pki, made["exact"], made["wild"], made["fallback"])


def closed_on_handshake(port: int, ctx: ssl.SSLContext, name: str | None) -> bool:
    """True if Portunus closes the connection before any TLS answer comes back."""
    try:
        tls_visit(port, ctx, name)
    except (ssl.SSLError, ConnectionError, EOFError):
        return True
    return False


def closed_after_sending(port: int, data: bytes) -> float:
    """Send ``data``, return the seconds until Portunus closed the connection."""
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=15) as s:
        if data:
            s.sendall(data)
        try:
            assert s.recv(64) == b"", "got bytes back: something answered"
        except ConnectionResetError:
            pass
    return time.monotonic() - t0


# ----------------------------------------------------------------- standalone


@dataclass
class Env:
    proc: StandaloneProc
    shared: int  # exact + wildcard + fallback
    strict: int  # exact + wildcard, no fallback
    origins: Origins


@pytest.fixture(scope="module")
def env(standalone_module: StandaloneFactory, ports: PortAllocator, tls_origins: Origins) -> Env:
    shared, strict = ports.ports(2)
    o = tls_origins
    proc = standalone_module(
        [
            {"name": "s-exact", "listen_port": shared, "sni": EXACT, "target": o.exact.address},
            {"name": "s-wild", "listen_port": shared, "sni": WILD, "target": o.wild.address},
            {"name": "s-fallback", "listen_port": shared, "target": o.fallback.address},
            {"name": "n-exact", "listen_port": strict, "sni": EXACT, "target": o.exact.address},
            {"name": "n-wild", "listen_port": strict, "sni": WILD, "target": o.wild.address},
        ]
    )
    return Env(proc, shared, strict, o)


ROUTES = [
    # (server_hostname, origin label, rule suffix, result label)
    (EXACT, "exact", "exact", "exact"),  # exact beats the wildcard
    ("API.Example.TEST", "exact", "exact", "exact"),  # names are case-insensitive
    ("www.example.test", "wild", "wild", "wildcard"),
    ("deep.sub.example.test", "fallback", "fallback", "fallback"),  # one label only
    ("example.test", "fallback", "fallback", "fallback"),  # the apex is not *.
    ("other.test", "fallback", "fallback", "fallback"),
    (None, "fallback", "fallback", "fallback"),  # no SNI at all
]


def route_counts(m: Metrics, prefix: str) -> dict[tuple[str, str], float]:
    return {
        (lab["rule"], lab["result"]): m.value("portunus_tls_sni_route_total", **lab)
        for lab in m.labels_of("portunus_tls_sni_route_total")
        if lab["rule"].startswith(prefix)
    }


def test_standalone_routes_exact_wildcard_fallback(env: Env) -> None:
    before = route_counts(env.proc.scrape(), "s-")
    expected: dict[tuple[str, str], float] = dict(before)
    for name, label, rule, result in ROUTES:
        ctx = env.origins.pki.client_context(check_hostname=name is not None)
        line = tls_visit(env.shared, ctx, name, payload=b"after the handshake" * 100)
        assert line == f"{label}|{name or '-'}", (name, line)  # replayed verbatim
        key = (f"s-{rule}", result)
        expected[key] = expected.get(key, 0) + 1

    def counted() -> bool:
        return route_counts(env.proc.scrape(), "s-") == expected

    wait_for(
        counted,
        5,
        what=lambda: f"route counters {expected}, have {route_counts(env.proc.scrape(), 's-')}",
    )
    labels = [
        lab
        for lab in env.proc.scrape().labels_of("portunus_tls_sni_route_total")
        if lab["rule"] == "s-wild"
    ]
    assert labels == [{"client": "local", "rule": "s-wild", "owner": "", "result": "wildcard"}]


def test_standalone_no_match_without_fallback_is_closed_and_counted(env: Env) -> None:
    strict = str(env.strict)
    m0 = env.proc.scrape()
    miss0 = m0.value("portunus_tls_sni_listener_miss_total", port=strict)
    mark = env.proc.log_mark()
    assert tls_visit(env.strict, env.origins.pki.client_context(), EXACT).startswith("exact|")
    assert closed_on_handshake(env.strict, env.origins.pki.client_context(), "other.test")
    env.proc.wait_log("tls.sni_no_match", since=mark, sni="other.test", port=env.strict)
    assert closed_on_handshake(env.strict, env.origins.pki.client_context(False), None)
    wait_for(
        lambda: (
            env.proc.scrape().value("portunus_tls_sni_listener_miss_total", port=strict)
            == miss0 + 2
        ),
        5,
        what="portunus_tls_sni_listener_miss_total += 2",
    )
    lab = [
        x
        for x in env.proc.scrape().labels_of("portunus_tls_sni_listener_miss_total")
        if x["port"] == strict
    ]
    assert lab == [{"client": "local", "port": strict}]


@pytest.mark.parametrize("which", ["shared", "strict"])
def test_standalone_non_tls_bytes_are_closed_and_counted(env: Env, which: str) -> None:
    """Even with a fallback rule, bytes that are not a ClientHello go nowhere."""
    port = getattr(env, which)
    fallback_seen = len(env.origins.fallback.records)
    failures0 = env.proc.scrape().value(
        "portunus_tls_sni_listener_parse_failures_total", port=str(port)
    )
    assert closed_after_sending(port, b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n") < 1.0
    wait_for(
        lambda: (
            env.proc.scrape().value(
                "portunus_tls_sni_listener_parse_failures_total", port=str(port)
            )
            == failures0 + 1
        ),
        5,
        what="parse_failures_total += 1",
    )
    assert len(env.origins.fallback.records) == fallback_seen


def test_standalone_oversize_client_hello_is_closed_and_counted(env: Env) -> None:
    """A ClientHello announcing more than the 16 KiB peek bound is refused at once."""
    port = str(env.strict)
    failures0 = env.proc.scrape().value("portunus_tls_sni_listener_parse_failures_total", port=port)
    mark = env.proc.log_mark()
    huge = (
        b"\x16\x03\x01\x40\x00" + b"\x01" + (20000).to_bytes(3, "big") + b"\x03\x03" + bytes(2000)
    )
    assert closed_after_sending(env.strict, huge) < 1.0
    env.proc.wait_log("tls.parse_failed", since=mark, reason="oversize")
    wait_for(
        lambda: (
            env.proc.scrape().value("portunus_tls_sni_listener_parse_failures_total", port=port)
            == failures0 + 1
        ),
        5,
        what="parse_failures_total += 1",
    )


def test_standalone_client_hello_split_across_segments_and_records(env: Env) -> None:
    ctx = env.origins.pki.client_context()
    by_segments = tls_visit_reshaped(
        env.strict, ctx, EXACT, reshape=lambda b: b, segment=16, gap=0.002
    )
    assert by_segments == f"exact|{EXACT}"
    by_records = tls_visit_reshaped(
        env.strict, ctx, "www.example.test", reshape=lambda b: split_into_records(b, 4)
    )
    assert by_records == "wild|www.example.test"
    both = tls_visit_reshaped(
        env.shared,
        env.origins.pki.client_context(),
        "other.test",
        reshape=lambda b: split_into_records(b, 3),
        segment=50,
        gap=0.002,
    )
    assert both == "fallback|other.test"


def test_standalone_silent_client_is_closed_after_the_peek_timeout(env: Env) -> None:
    """5 s to deliver the ClientHello: a partial one that stalls is cut and counted."""
    port = str(env.shared)
    failures0 = env.proc.scrape().value("portunus_tls_sni_listener_parse_failures_total", port=port)
    partial = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello that stops
    elapsed = closed_after_sending(env.shared, partial)
    assert 4.5 <= elapsed < 7.0, elapsed
    wait_for(
        lambda: (
            env.proc.scrape().value("portunus_tls_sni_listener_parse_failures_total", port=port)
            == failures0 + 1
        ),
        5,
        what="parse_failures_total += 1 after the timeout",
    )


def test_standalone_trickled_client_hello_is_cut_at_the_same_deadline(env: Env) -> None:
    """The 5 s are for the whole ClientHello, not between bytes: a peer that keeps
    sending one byte at a time cannot hold the peek open."""
    port = str(env.shared)
    failures0 = env.proc.scrape().value("portunus_tls_sni_listener_parse_failures_total", port=port)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40)  # never completes
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, env.shared), timeout=15) as s:
        try:
            for byte in hello:  # 12.75 s at one byte per 0.25 s
                s.sendall(bytes([byte]))
                time.sleep(0.25)
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - t0
        try:
            assert s.recv(64) == b""
        except ConnectionResetError:
            pass
    assert 4.5 <= elapsed < 7.0, elapsed
    wait_for(
        lambda: (
            env.proc.scrape().value("portunus_tls_sni_listener_parse_failures_total", port=port)
            == failures0 + 1
        ),
        5,
        what="parse_failures_total += 1 after the timeout",
    )


def test_standalone_bulk_transfer_after_routing(env: Env) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB both ways through the spliced relay
    line = tls_visit(
        env.shared, env.origins.pki.client_context(), "www.example.test", payload=payload
    )
    assert line == "wild|www.example.test"


@pytest.mark.parametrize(
    ("rule", "code"),
    [
        (
            {"protocol": "udp", "listen_port": 21000, "sni": EXACT},
            "validation.sni_on_unsupported_rule",
        ),
        (
            {"listen_ports": "21000-21001", "sni": EXACT, "target": "127.0.0.1:40000-40001"},
            "validation.sni_on_unsupported_rule",
        ),
        ({"listen_port": 21000, "sni": "*"}, "validation.sni_pattern"),
    ],
)
def test_standalone_check_refuses_bad_sni_rules(
    tmp_path: Path, rule: dict[str, Any], code: str
) -> None:
    full = {"name": "bad", "target": "127.0.0.1:40000", **rule}
    path = tmp_path / "sni.toml"
    path.write_text(standalone_toml({}, [full]))
    res = subprocess.run(
        [STANDALONE_BIN, "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2 and code in res.stderr, res


def test_standalone_sni_with_proxy_protocol(
    standalone: StandaloneFactory, ports: PortAllocator, tls_origins: Origins, tmp_path: Path
) -> None:
    """PROXY header first, then the replayed ClientHello: nginx strips the header and
    passes the TLS bytes on to the origin, and the handshake still completes."""
    require_nginx()
    pp_port, listen = ports.ports(2)
    nginx = NginxProxyOrigin(tmp_path, [pp_port], [tls_origins.wild.port])
    try:
        standalone(
            [
                {
                    "name": "sni-pp",
                    "listen_port": listen,
                    "sni": WILD,
                    "proxy_protocol": "v2",
                    "target": f"{LOOPBACK}:{pp_port}",
                }
            ]
        )
        with socket.create_connection((LOOPBACK, listen), timeout=10) as raw:
            client_port = raw.getsockname()[1]
            with tls_origins.pki.client_context().wrap_socket(
                raw, server_hostname="pp.example.test"
            ) as tls:
                assert tls.recv(100) == b"wild|pp.example.test\n"
        s = nginx.session_for(client_port)
        assert (s.addr, s.server_port_claimed) == (LOOPBACK, str(listen))
    finally:
        nginx.close()


# --------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def srv(server_module: ServerFactory) -> ServerProc:
    return server_module()


def _err(res: object) -> str:
    return getattr(res, "err", "")


def test_server_sni_rules_share_a_port_and_a_plain_rule_becomes_fallback(
    srv: ServerProc, ports: PortAllocator, tls_origins: Origins
) -> None:
    o = tls_origins
    port = ports.port()
    exact = srv.cli_json("push-rule", "local", str(port), o.exact.address, "--sni", EXACT)
    status, wild = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "listen_port": port,
            "sni_pattern": WILD,
            "targets": [{"host": LOOPBACK, "port": o.wild.port}],
        },
    )
    assert status == 201, wild
    assert (exact["sni_pattern"], wild["sni_pattern"]) == (EXACT, WILD)
    strict_ctx = o.pki.client_context()
    assert tls_visit(port, strict_ctx, EXACT) == f"exact|{EXACT}"
    assert tls_visit(port, strict_ctx, "www.example.test") == "wild|www.example.test"
    assert closed_on_handshake(port, strict_ctx, "other.test")
    wait_for(
        lambda: srv.scrape().value("portunus_tls_sni_listener_miss_total", port=str(port)) == 1,
        5,
        what="miss counted",
    )

    # A plain rule pushed onto the SNI port joins it as the fallback.
    fb = srv.cli_json("push-rule", "local", str(port), o.fallback.address)
    assert fb["state"] == "active" and fb["sni_pattern"] is None
    assert tls_visit(port, strict_ctx, "other.test") == "fallback|other.test"
    assert tls_visit(port, strict_ctx, EXACT) == f"exact|{EXACT}"

    def routes() -> dict[str, float]:
        m = srv.scrape()
        return {
            res: m.value("portunus_tls_sni_route_total", rule=str(r["id"]), result=res)
            for r, res in ((exact, "exact"), (wild, "wildcard"), (fb, "fallback"))
        }

    wait_for(
        lambda: routes() == {"exact": 2, "wildcard": 1, "fallback": 1},
        5,
        what=lambda: f"route counters by rule id, have {routes()}",
    )

    second = srv.cli("push-rule", "local", str(port), o.wild.address)
    assert second.code == 10 and "port_conflict" in second.err, second
    dup = srv.cli("push-rule", "local", str(port), o.wild.address, "--sni", EXACT)
    assert dup.code == 10 and "port_conflict" in dup.err, dup
    for r in (exact, wild, fb):
        srv.remove_rule(r["id"])


def test_server_sni_onto_a_plain_port_is_a_conflict(
    srv: ServerProc, ports: PortAllocator, origin: Callable[..., Origin]
) -> None:
    o = origin(port_reporter)
    port = ports.port()
    plain = srv.cli_json("push-rule", "local", str(port), o.address)
    res = srv.cli("push-rule", "local", str(port), o.address, "--sni", EXACT)
    assert res.code == 10, res
    assert "conflict.legacy_to_sni_unsupported" in res.err, res
    status, body = srv.http(
        "POST",
        "/v1/rules",
        {
            "client": "local",
            "listen_port": port,
            "sni_pattern": EXACT,
            "targets": [{"host": LOOPBACK, "port": o.port}],
        },
    )
    assert (status, body["error"]["code"]) == (409, "conflict.legacy_to_sni_unsupported")
    assert reached_port(port) == o.port  # the plain rule is untouched
    assert [
        r["id"] for r in srv.cli_json("list-rules")["rules"] if r.get("listen_port") == port
    ] == [plain["id"]]
    srv.remove_rule(plain["id"])


@pytest.mark.parametrize(
    ("args", "body", "code"),
    [
        (
            ["{p}", "127.0.0.1:40000", "--protocol", "udp", "--sni", EXACT],
            {
                "listen_port": "{p}",
                "protocol": "udp",
                "sni_pattern": EXACT,
                "targets": [{"host": LOOPBACK, "port": 40000}],
            },
            "validation.sni_on_unsupported_rule",
        ),
        (
            ["{p}-{p1}", "127.0.0.1:40000-40001", "--sni", EXACT],
            {
                "listen_port_start": "{p}",
                "listen_port_end": "{p1}",
                "sni_pattern": EXACT,
                "targets": [{"host": LOOPBACK, "port_start": 40000, "port_end": 40001}],
            },
            "validation.sni_on_unsupported_rule",
        ),
        (
            ["{p}", "127.0.0.1:40000", "--sni", "*"],
            {
                "listen_port": "{p}",
                "sni_pattern": "*",
                "targets": [{"host": LOOPBACK, "port": 40000}],
            },
            "validation.sni_pattern",
        ),
    ],
    ids=["udp", "range", "star"],
)
def test_server_sni_validation(
    srv: ServerProc, ports: PortAllocator, args: list[str], body: dict[str, Any], code: str
) -> None:
    p = ports.block(2)
    argv = [a.format(p=p, p1=p + 1) for a in args]
    res = srv.cli("push-rule", "local", *argv)
    assert res.code == 2 and code in res.err, res
    filled = {
        k: (int(v.format(p=p, p1=p + 1)) if isinstance(v, str) and "{" in v else v)
        for k, v in body.items()
    }
    status, reply = srv.http("POST", "/v1/rules", {"client": "local", **filled})
    assert (status, reply["error"]["code"]) == (400, code), reply


def test_server_sni_port_stays_sni_when_its_sni_rules_are_replaced(
    srv: ServerProc, ports: PortAllocator, tls_origins: Origins
) -> None:
    o = tls_origins
    port = ports.port()
    first = srv.cli_json("push-rule", "local", str(port), o.exact.address, "--sni", EXACT)
    fb = srv.cli_json("push-rule", "local", str(port), o.fallback.address)
    try:
        srv.remove_rule(first["id"])  # replacing the SNI rule: remove, then push the new one
        # Only the fallback is left, and the port is still an SNI port: bytes that are
        # not a ClientHello are closed, not forwarded to the fallback.
        fallback_seen = len(o.fallback.records)
        assert closed_after_sending(port, b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n") < 1.0
        assert len(o.fallback.records) == fallback_seen
        res = srv.cli(
            "push-rule", "local", str(port), o.wild.address, "--sni", WILD, "--format", "json"
        )
        assert res.code == 0, res
        assert (
            tls_visit(port, o.pki.client_context(), "www.example.test") == "wild|www.example.test"
        )
        srv.remove_rule(res.json["id"])
    finally:
        srv.remove_rule(fb["id"])
