"""server.toml and standalone TOML: every number finite and in range, every error
of every [[rule]] reported, in line order."""

from __future__ import annotations

from pathlib import Path

import pytest

from portunus.config import ConfigError, load_server_settings, load_standalone

RULE = '[[rule]]\nname = "web"\nlisten_port = 8080\ntarget = "10.0.0.5:80"\n'


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+inf", "1e400", "3601", "-0.5"])
def test_server_toml_refuses_non_finite_drain_timeout(tmp_path: Path, value: str) -> None:
    (tmp_path / "server.toml").write_text(f"shutdown_drain_timeout_secs = {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_server_settings(str(tmp_path), None)
    [err] = exc.value.errors
    assert err.startswith(
        f"{tmp_path / 'server.toml'}:1: shutdown_drain_timeout_secs must be a number in [0, 3600]"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("udp_flow_idle_secs", "nan"),
        ("udp_flow_idle_secs", "0"),
        ("connect_timeout_secs", "inf"),
        ("ack_timeout_secs", "nan"),
        ("stats_stream_interval_secs", "inf"),
        ("udp_max_flows", "1000001"),
        ("range_rule_max_ports", "65536"),
        ("shards", "257"),
    ],
)
def test_every_numeric_setting_is_bounded(tmp_path: Path, key: str, value: str) -> None:
    path = tmp_path / "forward.toml"
    path.write_text(f"{key} = {value}\n" + RULE)
    with pytest.raises(ConfigError) as exc:
        load_standalone(str(path))
    [err] = exc.value.errors
    assert err.startswith(f"{path}:1: {key} must be "), err


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "0", "0.01", '"5"', "true"])
def test_rule_health_check_interval_is_bounded(tmp_path: Path, value: str) -> None:
    path = tmp_path / "forward.toml"
    path.write_text(RULE + f"health_check_interval_secs = {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_standalone(str(path))
    [err] = exc.value.errors
    assert err.startswith(
        f"{path}:5: validation.health_check_interval_secs: health_check_interval_secs"
    ), err


def test_check_reports_every_error_of_a_rule_in_line_order(tmp_path: Path) -> None:
    path = tmp_path / "forward.toml"
    path.write_text(
        'log_format = "xml"\n'  # 1
        "[[rule]]\n"  # 2
        'name = "a"\n'  # 3
        "health_check_interval_secs = nan\n"  # 4
        'protocol = "sctp"\n'  # 5
        "listen_port = 8080\n"  # 6
        'sni = "*"\n'  # 7
        'target = "10.0.0.5:80@0"\n'  # 8
        "rate_limit = { bandwidth_in_bps = 0, new_connections_per_sec = inf }\n"  # 9
        'prefer_ipv6 = "yes"\n'  # 10
        "[[rule]]\n"  # 11
        'name = "b"\n'  # 12
        "listen_port = 0\n"  # 13
        'targets = [{ host = "h", port = 70000 }, { host = "x y", port = 1 }]\n'  # 14
    )
    with pytest.raises(ConfigError) as exc:
        load_standalone(str(path))
    lines = [int(e[len(str(path)) + 1 :].split(":", 1)[0]) for e in exc.value.errors]
    assert lines == sorted(lines), exc.value.errors
    assert lines == [1, 4, 5, 7, 8, 9, 9, 10, 13, 14, 14], exc.value.errors
    text = "\n".join(exc.value.errors)
    for needle in (
        "log_format",
        "health_check_interval_secs",
        "sctp",
        "SNI pattern",
        "priority",
        "rate_limit.bandwidth_in_bps",
        "rate_limit.new_connections_per_sec",
        "prefer_ipv6",
        "listen_port",
        "70000",
        "'x y'",
    ):
        assert needle in text, needle


def test_huge_values_do_not_crash_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "forward.toml"
    path.write_text(
        "[[rule]]\n"
        f'name = "{"n" * 500}"\n'
        f'listen_ports = "{"9" * 5000}-1"\n'
        f'target = "{"h" * 10000}:80"\n'
        f'sni = "{"a." * 300}com"\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_standalone(str(path))
    assert len(exc.value.errors) == 4, exc.value.errors
    assert all(len(e) < 600 for e in exc.value.errors), exc.value.errors
