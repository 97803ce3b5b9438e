"""portunus.config.load_standalone: rules from [[rule]] tables, top-level settings
with their contract defaults, and every error reported as ``file:line: message``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portunus.config import ConfigError, Settings, load_standalone
from portunus.rules import Target


def load(tmp_path: Path, text: str) -> tuple[Settings, list]:  # type: ignore[type-arg]
    path = tmp_path / "forward.toml"
    path.write_text(text)
    return load_standalone(str(path))


def errors(tmp_path: Path, text: str) -> list[tuple[int, str]]:
    """(line, message) of every error; asserts each is ``file:line: message``."""
    path = tmp_path / "forward.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_standalone(str(path))
    out: list[tuple[int, str]] = []
    for e in exc.value.errors:
        assert e.startswith(f"{path}:"), e
        line, _, msg = e[len(str(path)) + 1 :].partition(": ")
        out.append((int(line), msg))
    return out


RULE = '[[rule]]\nname = "web"\nlisten_port = 8080\ntarget = "10.0.0.5:80"\n'


# ------------------------------------------------------------------ rules


def test_minimal_rule_and_defaults(tmp_path: Path) -> None:
    s, rules = load(tmp_path, RULE)
    assert s.metrics_listen == "127.0.0.1:7083"  # not the server's 7081: both may run on one host
    assert s.listen_address == "0.0.0.0"
    assert s.shutdown_drain_timeout_secs == 30.0
    assert s.connect_timeout_secs == 5.0
    assert s.log_format == "json"
    assert s.range_rule_max_ports == 1024
    assert s.shards == 0
    [r] = rules
    assert (r.id, r.protocol, r.listen_start, r.listen_end) == ("web", "tcp", 8080, 8080)
    assert r.targets == (Target(host="10.0.0.5", port=80),)
    assert (r.client, r.owner, r.sni, r.proxy_protocol) == ("local", "", None, None)
    assert not r.is_range


def test_no_rules_is_valid(tmp_path: Path) -> None:
    _s, rules = load(tmp_path, 'log_format = "text"\n')
    assert rules == []


def test_listen_ports_range_with_target_range(tmp_path: Path) -> None:
    _s, [r] = load(
        tmp_path,
        '[[rule]]\nname = "r"\nlisten_ports = "30000-30099"\ntarget = "10.0.0.5:40000-40099"\n',
    )
    assert (r.listen_start, r.listen_end) == (30000, 30099)
    assert r.is_range and len(r.ports) == 100
    assert (r.targets[0].port, r.targets[0].port_end) == (40000, 40099)
    assert r.listener_keys()[0] == "tcp/30000" and r.listener_keys()[-1] == "tcp/30099"


def test_listen_ports_range_with_single_target_port_is_a_mismatch(tmp_path: Path) -> None:
    [(line, msg)] = errors(
        tmp_path, '[[rule]]\nname = "r"\nlisten_ports = "30000-30001"\ntarget = "10.0.0.5:40000"\n'
    )
    assert line == 4 and msg.startswith("validation.range_length_mismatch")


def test_listen_ports_single_port_text(tmp_path: Path) -> None:
    _s, [r] = load(tmp_path, '[[rule]]\nname = "r"\nlisten_ports = "8080"\ntarget = "h:80"\n')
    assert (r.listen_start, r.listen_end) == (8080, 8080)


@pytest.mark.parametrize(
    ("snippet", "needle"),
    [
        ('listen_ports = "9-1"', "reversed"),
        ('listen_ports = "1-70000"', "outside 1-65535"),
        ('listen_ports = "a-b"', "not a number"),
        ('listen_port = "8080"', "listen_port must be a number"),
        ("listen_port = 0", "outside 1-65535"),
    ],
)
def test_bad_listen_ports(tmp_path: Path, snippet: str, needle: str) -> None:
    [(line, msg)] = errors(tmp_path, f'[[rule]]\nname = "r"\n{snippet}\ntarget = "h:80"\n')
    assert line == 3 and needle in msg


def test_listen_port_and_listen_ports_together(tmp_path: Path) -> None:
    errs = errors(
        tmp_path, '[[rule]]\nname = "r"\nlisten_port = 1\nlisten_ports = "1-2"\ntarget = "h:80"\n'
    )
    assert (4, "give listen_port or listen_ports, not both") in errs


def test_missing_listen_and_target_point_at_the_header(tmp_path: Path) -> None:
    errs = errors(tmp_path, 'log_format = "text"\n\n[[rule]]\nname = "r"\n')
    assert sorted(line for line, _ in errs) == [3, 3]
    assert any("listen_port" in m for _, m in errs) and any("target" in m for _, m in errs)


def test_missing_or_bad_name(tmp_path: Path) -> None:
    errs = errors(
        tmp_path,
        '[[rule]]\nlisten_port = 1\ntarget = "h:80"\n\n'
        '[[rule]]\nname = "has space"\nlisten_port = 2\ntarget = "h:80"\n',
    )
    assert [line for line, _ in errs] == [1, 6]
    assert all("needs name" in m for _, m in errs)


def test_targets_tables_sorted_by_priority(tmp_path: Path) -> None:
    _s, [r] = load(
        tmp_path,
        '[[rule]]\nname = "t"\nlisten_port = 80\ntargets = [\n'
        '  { host = "b.example", port = 81, priority = 2, proxy_protocol = "v2" },\n'
        '  { host = "A.Example.", port = 82 },\n'
        '  { host = "::1", port = 83, priority = 3 },\n]\n',
    )
    assert [(t.host, t.port, t.priority) for t in r.targets] == [
        ("a.example", 82, 1),
        ("b.example", 81, 2),
        ("::1", 83, 3),
    ]
    assert r.targets[1].proxy_protocol == "v2"
    assert r.targets[2].label == "[::1]:83"


def test_targets_ranges_by_ports_or_port_end(tmp_path: Path) -> None:
    _s, [r] = load(
        tmp_path,
        '[[rule]]\nname = "t"\nlisten_ports = "100-109"\ntargets = [\n'
        '  { host = "h1", ports = "200-209" },\n'
        '  { host = "h2", port = 300, port_end = 309, priority = 2 },\n]\n',
    )
    assert [(t.port, t.port_end) for t in r.targets] == [(200, 209), (300, 309)]


@pytest.mark.parametrize(
    ("targets", "needle"),
    [
        ("[]", "non-empty list"),
        ('[{ host = "h", port = 1, weight = 3 }]', "unknown key(s) weight"),
        ("[{ port = 1 }]", "needs host and port"),
        (
            '[{ host = "h", port = 1, priority = 0 }]',
            "priority must be an integer in 1-1000, got 0",
        ),
        ('[{ host = "h", port = 1, proxy_protocol = "v3" }]', "proxy_protocol"),
        ('["h:1"]', "must be a table"),
        ('[{ host = "bad host", port = 1 }]', "neither an IP address nor a valid DNS name"),
    ],
)
def test_bad_targets_tables(tmp_path: Path, targets: str, needle: str) -> None:
    [(line, msg)] = errors(
        tmp_path, f'[[rule]]\nname = "t"\nlisten_port = 80\ntargets = {targets}\n'
    )
    assert line == 4 and needle in msg, msg


def test_target_and_targets_together(tmp_path: Path) -> None:
    errs = errors(
        tmp_path,
        '[[rule]]\nname = "t"\nlisten_port = 80\ntarget = "h:1"\n'
        'targets = [{ host = "h", port = 2 }]\n',
    )
    assert (5, "give target or targets, not both") in errs


def test_target_string_with_priority_and_bad_target(tmp_path: Path) -> None:
    _s, [r] = load(
        tmp_path, '[[rule]]\nname = "t"\nlisten_port = 80\ntarget = "[2001:db8::1]:443@3"\n'
    )
    assert (r.targets[0].host, r.targets[0].port, r.targets[0].priority) == ("2001:db8::1", 443, 3)
    [(line, msg)] = errors(tmp_path, '[[rule]]\nname = "t"\nlisten_port = 80\ntarget = "no-port"\n')
    assert line == 4 and "HOST:PORT" in msg


def test_sni_normalised_and_refused_on_udp_and_ranges(tmp_path: Path) -> None:
    _s, [r] = load(
        tmp_path,
        '[[rule]]\nname = "s"\nlisten_port = 443\ntarget = "h:443"\nsni = "*.Example.COM."\n',
    )
    assert r.sni == "*.example.com"
    errs = errors(
        tmp_path,
        '[[rule]]\nname = "s"\nprotocol = "udp"\nlisten_port = 443\ntarget = "h:443"\n'
        'sni = "a.example"\n\n[[rule]]\nname = "r"\nlisten_ports = "1-2"\n'
        'target = "h:1-2"\nsni = "b.example"\n',
    )
    assert [line for line, _ in errs] == [6, 12]
    assert all(m.startswith("validation.sni_on_unsupported_rule") for _, m in errs)


def test_unknown_protocol(tmp_path: Path) -> None:
    [(line, msg)] = errors(
        tmp_path, '[[rule]]\nname = "p"\nprotocol = "sctp"\nlisten_port = 1\ntarget = "h:1"\n'
    )
    assert line == 3 and msg.startswith("validation.protocol")


def test_duplicate_names_and_port_conflicts(tmp_path: Path) -> None:
    text = (
        RULE + '\n[[rule]]\nname = "web"\nlisten_port = 8081\ntarget = "h:1"\n'
        '\n[[rule]]\nname = "range"\nlisten_ports = "8070-8090"\ntarget = "h:1-21"\n'
        '\n[[rule]]\nname = "udp-same-port"\nprotocol = "udp"\nlisten_port = 8080\ntarget = "h:1"\n'
    )
    errs = errors(tmp_path, text)
    assert (7, "duplicate rule name 'web' (first at rule #1)") in errs
    assert any(line == 13 and m.startswith("port_conflict") and "'web'" in m for line, m in errs)
    assert len(errs) == 2  # udp/8080 does not conflict with tcp/8080


def test_sni_rules_may_share_a_port_but_not_two_fallbacks(tmp_path: Path) -> None:
    sni = '[[rule]]\nname = "{n}"\nlisten_port = 443\ntarget = "h:443"\n{extra}\n'
    ok = (
        sni.format(n="a", extra='sni = "a.example"')
        + sni.format(n="b", extra='sni = "*.example"')
        + sni.format(n="fb", extra="")
    )
    _s, rules = load(tmp_path, ok)
    assert len(rules) == 3
    errs = errors(tmp_path, ok + sni.format(n="fb2", extra=""))
    assert len(errs) == 1 and errs[0][1].startswith("port_conflict")


def test_range_rule_max_ports(tmp_path: Path) -> None:
    text = 'range_rule_max_ports = 10\n[[rule]]\nname = "r"\nlisten_ports = "1-11"\ntarget = "h:1-11"\n'
    [(line, msg)] = errors(tmp_path, text)
    assert line == 4 and msg.startswith("validation.range_too_large")
    _s, [r] = load(tmp_path, text.replace("1-11", "1-10"))
    assert len(r.ports) == 10


def test_rule_must_be_an_array_of_tables(tmp_path: Path) -> None:
    [(line, msg)] = errors(tmp_path, '[rule]\nname = "x"\n')
    assert "write [[rule]]" in msg and line == 1


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=60000),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=60000),
)
def test_range_rules_round_trip_through_toml(lo: int, n: int, tlo: int) -> None:
    hi, thi = lo + n - 1, tlo + n - 1
    with tempfile.TemporaryDirectory() as d:
        _s, [r] = load(
            Path(d),
            f'[[rule]]\nname = "r"\nlisten_ports = "{lo}-{hi}"\n'
            f'targets = [{{ host = "h", ports = "{tlo}-{thi}" }}]\n',
        )
    assert (r.listen_start, r.listen_end) == (lo, hi)
    t = r.targets[0]
    assert (t.port, t.port_end if n > 1 else t.port) == (tlo, thi)


# --------------------------------------------------------------- settings


def test_settings_keys(tmp_path: Path) -> None:
    s, _ = load(
        tmp_path,
        'metrics_listen = "127.0.0.1:9100"\nlisten_address = "127.0.0.1"\n'
        "shutdown_drain_timeout_secs = 3\nconnect_timeout_secs = 0.5\n"
        'log_format = "text"\nlog_level = "debug"\nudp_flow_idle_secs = 10\n'
        "udp_max_flows = 5\nrange_rule_max_ports = 7\nshards = 3\n",
    )
    assert s.metrics_listen == "127.0.0.1:9100"
    assert s.listen_address == "127.0.0.1"
    assert s.shutdown_drain_timeout_secs == 3.0 and isinstance(s.shutdown_drain_timeout_secs, float)
    assert s.connect_timeout_secs == 0.5
    assert (s.log_format, s.log_level) == ("text", "debug")
    assert (s.udp_flow_idle_secs, s.udp_max_flows, s.range_rule_max_ports) == (10.0, 5, 7)
    assert s.shards == 3 and s.shard_count() == 3


def test_shards_zero_means_one_per_cpu(tmp_path: Path) -> None:
    import os

    s, _ = load(tmp_path, "shards = 0\n")
    assert s.shard_count() == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("line_text", "needle"),
    [
        ("bogus = 1", "unknown key 'bogus'"),
        ('log_format = "xml"', 'log_format must be "json" or "text"'),
        ('shutdown_drain_timeout_secs = "5"', "must be a number in [0, 3600], got a string"),
        ("shutdown_drain_timeout_secs = -1", "must be a number in [0, 3600], got -1"),
        ("connect_timeout_secs = true", "must be a number in (0, 300], got true"),
        ("udp_max_flows = 0", "must be an integer in 1-1000000, got 0"),
        ("range_rule_max_ports = 1.5", "must be an integer in 1-65535, got 1.5"),
        ('metrics_listen = "nope"', "metrics_listen"),
        ('metrics_listen = "127.0.0.1:0"', "outside 1-65535"),
        ('listen_address = "not an address"', "neither an IP address nor a valid DNS name"),
        ("log_level = 3", "log_level must be a string"),
        ("shards = -1", "shards must be an integer in 0-256, got -1"),
        ("shards = true", "shards must be an integer in 0-256, got true"),
    ],
)
def test_bad_settings(tmp_path: Path, line_text: str, needle: str) -> None:
    errs = errors(tmp_path, f"# settings first\n{line_text}\n" + RULE)
    assert len(errs) == 1, errs
    line, msg = errs[0]
    assert line == 2 and needle in msg, msg


def test_all_errors_are_reported_not_only_the_first(tmp_path: Path) -> None:
    errs = errors(
        tmp_path,
        'bogus = 1\nlog_format = "xml"\n[[rule]]\nname = "a"\nlisten_port = 0\n'
        'target = "h:1"\nextra = 1\n',
    )
    assert sorted(line for line, _ in errs) == [1, 2, 5, 7]


def test_unreadable_and_non_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_standalone(str(tmp_path / "missing.toml"))
    assert exc.value.errors[0].endswith("cannot read: No such file or directory")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'name = "\xe9"\n')
    with pytest.raises(ConfigError) as exc:
        load_standalone(str(bad))
    assert exc.value.errors == [f"{bad}: not UTF-8 text"]
    [(line, msg)] = errors(tmp_path, "a = 1\n\nb = = 2\n")
    assert line == 3 and msg.startswith("TOML syntax error")


def test_edge_preauth_keys_default_and_load(tmp_path: Path) -> None:
    from portunus.config import load_server_settings

    s = load_server_settings(str(tmp_path), None)
    assert (s.edge_preauth_max_connections, s.edge_preauth_max_per_source) == (128, 16)
    assert s.edge_handshake_timeout_secs == 10.0
    assert s.edge_preauth_park_secs == 25.0
    conf = tmp_path / "server.toml"
    conf.write_text(
        "edge_preauth_max_connections = 500\nedge_preauth_max_per_source = 2\n"
        "edge_handshake_timeout_secs = 2.5\nedge_preauth_park_secs = 1.5\n"
    )
    s = load_server_settings(str(tmp_path), str(conf))
    assert (s.edge_preauth_max_connections, s.edge_preauth_max_per_source) == (500, 2)
    assert s.edge_handshake_timeout_secs == 2.5
    assert s.edge_preauth_park_secs == 1.5


@pytest.mark.parametrize(
    ("line_text", "needle"),
    [
        (
            "edge_preauth_max_connections = 0",
            "edge_preauth_max_connections must be an integer in 1-1000000, got 0",
        ),
        (
            "edge_preauth_max_per_source = 1.5",
            "edge_preauth_max_per_source must be an integer in 1-1000000, got 1.5",
        ),
        (
            "edge_handshake_timeout_secs = 0",
            "edge_handshake_timeout_secs must be a number in (0, 300], got 0",
        ),
        (
            "edge_preauth_park_secs = 0",
            "edge_preauth_park_secs must be a number in (0, 300], got 0",
        ),
        (
            "edge_handshake_timeout_secs = 301",
            "edge_handshake_timeout_secs must be a number in (0, 300], got 301",
        ),
        (
            'edge_handshake_timeout_secs = "10"',
            "edge_handshake_timeout_secs must be a number in (0, 300], got a string",
        ),
    ],
)
def test_bad_edge_preauth_keys(tmp_path: Path, line_text: str, needle: str) -> None:
    from portunus.config import load_server_settings

    conf = tmp_path / "server.toml"
    conf.write_text(f"# first\n{line_text}\n")
    with pytest.raises(ConfigError) as info:
        load_server_settings(str(tmp_path), str(conf))
    (err,) = info.value.errors
    assert err.startswith(f"{conf}:2: ") and needle in err, err


def test_slow_client_keys_default_and_load(tmp_path: Path) -> None:
    from portunus.config import load_server_settings
    from portunus.shard.sni import CLIENT_HELLO_TIMEOUT_SECS
    from portunus.web.limits import MAX_CONNECTIONS, REQUEST_TIMEOUT_SECS

    s = load_server_settings(str(tmp_path), None)
    assert (s.http_request_timeout_secs, s.http_max_connections) == (
        REQUEST_TIMEOUT_SECS,
        MAX_CONNECTIONS,
    )
    assert s.sni_client_hello_timeout_secs == CLIENT_HELLO_TIMEOUT_SECS == 5.0
    conf = tmp_path / "server.toml"
    conf.write_text(
        "http_request_timeout_secs = 2.5\nhttp_max_connections = 4096\n"
        "sni_client_hello_timeout_secs = 1\n"
    )
    s = load_server_settings(str(tmp_path), str(conf))
    assert (s.http_request_timeout_secs, s.http_max_connections) == (2.5, 4096)
    assert s.sni_client_hello_timeout_secs == 1.0


@pytest.mark.parametrize(
    ("line_text", "needle"),
    [
        (
            "http_request_timeout_secs = 0",
            "http_request_timeout_secs must be a number in (0, 300], got 0",
        ),
        (
            "http_request_timeout_secs = nan",
            "http_request_timeout_secs must be a number in (0, 300]",
        ),
        (
            "http_max_connections = 0",
            "http_max_connections must be an integer in 1-1000000, got 0",
        ),
        (
            "http_max_connections = 2.5",
            "http_max_connections must be an integer in 1-1000000, got 2.5",
        ),
        (
            "sni_client_hello_timeout_secs = 301",
            "sni_client_hello_timeout_secs must be a number in (0, 300], got 301",
        ),
        (
            "sni_client_hello_timeout_secs = inf",
            "sni_client_hello_timeout_secs must be a number in (0, 300]",
        ),
    ],
)
def test_bad_slow_client_keys(tmp_path: Path, line_text: str, needle: str) -> None:
    from portunus.config import load_server_settings

    conf = tmp_path / "server.toml"
    conf.write_text(f"# first\n{line_text}\n")
    with pytest.raises(ConfigError) as info:
        load_server_settings(str(tmp_path), str(conf))
    (err,) = info.value.errors
    assert err.startswith(f"{conf}:2: ") and needle in err, err
