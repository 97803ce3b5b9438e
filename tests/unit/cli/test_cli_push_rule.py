"""push-rule: arguments → the exact rules.push params, and its output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from portunus.cli import common
from portunus.errors import PortunusError


def rule(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 7,
        "client": "local",
        "client_id": "c-local",
        "protocol": "tcp",
        "listen_port": 18080,
        "targets": [{"host": "127.0.0.1", "port": 8080, "priority": 1}],
        "sni_pattern": None,
        "proxy_protocol": None,
        "prefer_ipv6": False,
        "health_check_interval_secs": 5.0,
        "rate_limit": None,
        "owner": "",
        "state": "active",
        "failure_reason": None,
        "created_at": "2024-05-01T12:00:00Z",
    }
    base.update(over)
    return base


def test_single_port_sends_http_shaped_body_and_prints_summary(control, run) -> None:
    control.reply("rules.push", rule())
    res = run("push-rule", "local", "18080", "127.0.0.1:8080")
    assert res.exit_code == 0, res.stderr
    req = control.last
    assert req["method"] == "rules.push"
    assert req["token"] == "test-operator-token"
    assert req["params"] == {
        "client": "local",
        "protocol": "tcp",
        "listen_port": 18080,
        "targets": [{"host": "127.0.0.1", "port": 8080, "priority": 1}],
        "ack_timeout": 2.0,
    }
    assert res.stdout == "rule 7 active: local tcp 18080 -> 127.0.0.1:8080\n"


def test_range_uses_start_end_on_listen_and_target(control, run) -> None:
    control.reply("rules.push", rule(listen_port=None))
    res = run(
        "push-rule", "edge-01", "30000-30050", "Upstream.Local:30000-30050", "--protocol", "udp"
    )
    assert res.exit_code == 0, res.stderr
    assert control.last["params"] == {
        "client": "edge-01",
        "protocol": "udp",
        "listen_port_start": 30000,
        "listen_port_end": 30050,
        "targets": [
            {"host": "upstream.local", "port_start": 30000, "port_end": 30050, "priority": 1}
        ],
        "ack_timeout": 2.0,
    }


def test_multi_target_priorities_positional_first(control, run) -> None:
    control.reply("rules.push", rule())
    res = run(
        "push-rule",
        "edge-01",
        "8080",
        "a.internal:80",
        "--target",
        "b.internal:81@2",
        "--target",
        "[::1]:82@3",
    )
    assert res.exit_code == 0, res.stderr
    assert control.last["params"]["targets"] == [
        {"host": "a.internal", "port": 80, "priority": 1},
        {"host": "b.internal", "port": 81, "priority": 2},
        {"host": "::1", "port": 82, "priority": 3},
    ]


def test_targets_only_from_flags(control, run) -> None:
    control.reply("rules.push", rule())
    res = run("push-rule", "edge-01", "8080", "--target", "a:80@1", "--target", "b:80@2")
    assert res.exit_code == 0, res.stderr
    assert [t["host"] for t in control.last["params"]["targets"]] == ["a", "b"]
    assert [t["priority"] for t in control.last["params"]["targets"]] == [1, 2]


def test_sni_proxy_ipv6_health_and_caps(control, run) -> None:
    control.reply("rules.push", rule())
    res = run(
        "push-rule",
        "edge-01",
        "443",
        "api.internal:8443",
        "--sni",
        "*.example.com",
        "--proxy-protocol",
        "v2",
        "--prefer-ipv6",
        "--health-check-interval-secs",
        "2.5",
        "--bandwidth-in-bps",
        "1000000",
        "--bandwidth-out-bps",
        "2000000",
        "--new-connections-per-sec",
        "50",
        "--concurrent-connections",
        "100",
        "--bandwidth-in-bps-burst",
        "3000000",
        "--concurrent-connections-burst",
        "120",
        "--ack-timeout",
        "5",
    )
    assert res.exit_code == 0, res.stderr
    assert control.last["params"] == {
        "client": "edge-01",
        "protocol": "tcp",
        "listen_port": 443,
        "targets": [{"host": "api.internal", "port": 8443, "priority": 1}],
        "sni_pattern": "*.example.com",
        "proxy_protocol": "v2",
        "prefer_ipv6": True,
        "rate_limit": {
            "bandwidth_in_bps": 1000000,
            "bandwidth_out_bps": 2000000,
            "new_connections_per_sec": 50,
            "concurrent_connections": 100,
            "bandwidth_in_bps_burst": 3000000,
            "concurrent_connections_burst": 120,
        },
        "health_check_interval_secs": 2.5,
        "ack_timeout": 5.0,
    }


def test_socket_waits_longer_than_the_ack_timeout(control, run, monkeypatch) -> None:
    seen: dict[str, Any] = {}

    def spy(path: str, token: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        seen.update(method=method, timeout=timeout, ack=params["ack_timeout"])
        return rule()

    monkeypatch.setattr(common, "call_sync", spy)
    res = run("push-rule", "local", "18080", "127.0.0.1:8080", "--ack-timeout", "3")
    assert res.exit_code == 0, res.stderr
    assert seen["ack"] == 3.0
    assert seen["timeout"] > seen["ack"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["70000", "h:80"], "validation.port"),
        (["9000-8000", "h:80"], "validation.port_range"),
        (["8080", "h"], "validation.target"),
        (["8080", "h:80@0"], "validation.priority"),
        (["8080"], "validation.targets"),
        (
            ["8080", "h:80", *sum((["--target", f"h{i}:80@{i + 2}"] for i in range(8)), [])],
            "validation.targets",
        ),
    ],
)
def test_malformed_input_exits_2_without_a_request(control, run, args, code) -> None:
    res = run("push-rule", "local", *args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"error: {code}: ")
    assert "hint: see `portunus-server push-rule --help`" in res.stderr
    assert control.requests == []


def test_unknown_choice_is_a_click_usage_error(control, run) -> None:
    res = run("push-rule", "local", "8080", "h:80", "--proxy-protocol", "v3")
    assert res.exit_code == 2
    assert control.requests == []


def test_server_validation_error_passes_through_with_exit_2(control, run) -> None:
    control.reply(
        "rules.push",
        PortunusError(
            "validation.range_length_mismatch",
            "listen range 30000-30050 has 51 ports but target h:1-2 has 2",
        ),
    )
    res = run("push-rule", "local", "30000-30050", "h:1-2")
    assert res.exit_code == 2
    assert res.stderr.splitlines()[0] == (
        "error: validation.range_length_mismatch: listen range 30000-30050 has 51 ports but target h:1-2 has 2"
    )


@pytest.mark.parametrize(
    ("code", "exit_code", "state"),
    [("activation_failed", 6, "failed"), ("ack_timeout", 7, "pending")],
)
def test_kept_rule_is_printed_in_json_for_scripts(control, run, code, exit_code, state) -> None:
    kept = rule(
        state=state,
        failure_reason="port_in_use (port 18080 already bound)" if state == "failed" else None,
    )
    control.reply("rules.push", PortunusError(code, "it did not work", rule=kept))
    res = run("push-rule", "local", "18080", "127.0.0.1:8080", "--format", "json")
    assert res.exit_code == exit_code
    assert json.loads(res.stdout) == kept
    assert res.stderr.startswith(f"error: {code}: it did not work\nhint: ")
    assert "7" in res.stderr.splitlines()[1]


def test_kept_rule_not_on_stdout_in_text(control, run) -> None:
    control.reply(
        "rules.push",
        PortunusError(
            "activation_failed", "port_in_use (port 18080 already bound)", rule=rule(state="failed")
        ),
    )
    res = run("push-rule", "local", "18080", "127.0.0.1:8080")
    assert res.exit_code == 6
    assert res.stdout == ""
    assert res.stderr == (
        "error: activation_failed: port_in_use (port 18080 already bound)\n"
        "hint: the rule is kept as failed; remove it with `portunus-server remove-rule 7`\n"
    )


def test_json_success_prints_the_rule_verbatim(control, run) -> None:
    r = rule(sni_pattern="api.example.com", proxy_protocol="v1")
    control.reply("rules.push", r)
    res = run(
        "push-rule", "local", "443", "api:8443", "--sni", "api.example.com", "--format", "json"
    )
    assert res.exit_code == 0
    assert json.loads(res.stdout) == r


def test_text_summary_shows_priorities_and_extras(control, run) -> None:
    control.reply(
        "rules.push",
        rule(
            client="edge-01",
            listen_port=443,
            sni_pattern="api.example.com",
            proxy_protocol="v2",
            targets=[
                {"host": "a", "port": 80, "priority": 1},
                {"host": "::1", "port": 81, "priority": 2},
            ],
        ),
    )
    res = run(
        "push-rule", "edge-01", "443", "a:80", "--target", "[::1]:81@2", "--sni", "api.example.com"
    )
    assert (
        res.stdout
        == "rule 7 active: edge-01 tcp 443 -> a:80@1,[::1]:81@2 [sni=api.example.com proxy=v2]\n"
    )
