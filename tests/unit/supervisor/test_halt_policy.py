"""The supervisor's halt/respawn table (supervisor/policy.py) and the reload diff
(supervisor/reload.py): pure logic, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from portunus.config import ConfigError, Settings, load_server_settings
from portunus.exitcodes import ChildExit, ServiceExit
from portunus.supervisor.policy import CRASH_LOOP_DEATHS, Death, DeathLog, Role, decide
from portunus.supervisor.reload import RELOADABLE, SettingsReloader, apply_settings, diff


def exited(code: int, up: bool = True) -> Death:
    return Death(code=code, how=f"exit {code}", was_up=up)


def killed(up: bool = True) -> Death:
    return Death(code=None, how="signal SIGKILL", was_up=up)


@pytest.mark.parametrize("role", list(Role))
def test_cannot_start_is_fatal_for_every_role(role: Role) -> None:
    halt = decide(role, exited(1, up=False), 1)
    assert (
        halt is not None and halt.code == ServiceExit.BOOT_FAILED and "could not start" in halt.why
    )


@pytest.mark.parametrize("role", list(Role))
def test_one_death_after_a_good_start_is_respawned(role: Role) -> None:
    assert decide(role, exited(1), 1) is None
    assert decide(role, killed(), 1) is None
    assert decide(role, killed(up=False), 1) is None  # killed, not unable to start


@pytest.mark.parametrize(
    ("code", "want"),
    [(ChildExit.CONFIG, ServiceExit.CONFIG), (ChildExit.LISTEN_FAILED, ServiceExit.LISTEN_FAILED)],
)
def test_table_codes_halt_whenever_they_happen(code: int, want: ServiceExit) -> None:
    for up in (True, False):
        halt = decide(Role.CONTROL, exited(code, up), 1)
        assert halt is not None and halt.code == want


def test_revoked_is_the_links_code_only() -> None:
    halt = decide(Role.LINK, exited(ChildExit.REVOKED), 1)
    assert halt is not None and halt.code == ServiceExit.REVOKED == 4 and "revoked" in halt.why
    assert (
        decide(Role.SHARD, exited(ChildExit.REVOKED), 1) is None
    )  # another role: an ordinary death


def test_crash_loop_after_n_deaths_in_the_window() -> None:
    log = DeathLog(window=60.0)
    verdicts = [
        decide(Role.SHARD, killed(), log.record("shard-0", t)) for t in range(CRASH_LOOP_DEATHS)
    ]
    assert verdicts[:-1] == [None] * (CRASH_LOOP_DEATHS - 1)
    last = verdicts[-1]
    assert (
        last is not None
        and last.code == ServiceExit.CRASH_LOOP
        and f"died {CRASH_LOOP_DEATHS} times" in last.why
    )


def test_deaths_outside_the_window_do_not_count() -> None:
    log = DeathLog(window=10.0)
    counts = [log.record("web", t * 11.0) for t in range(10)]
    assert counts == [1] * 10
    assert log.record("control", 0.0) == 1  # per child


def test_reload_diff_splits_reloadable_from_restart_keys() -> None:
    old = Settings()
    new = Settings(
        log_level="debug",
        udp_max_flows=7,
        metrics_listen="127.0.0.1:9999",
        shards=4,
        config_path="/x",
    )
    changed, restart = diff(old, new)
    assert changed == {"log_level": "debug", "udp_max_flows": 7}
    assert restart == ["metrics_listen"]  # shards and config_path are not file keys
    apply_settings(old, {**changed, "metrics_listen": "127.0.0.1:1"})
    assert old.udp_max_flows == 7 and old.metrics_listen == "127.0.0.1:7081"


def test_gateway_and_traffic_keys_need_a_restart() -> None:
    """Control builds the gateway's pre-auth limits and the traffic sampler once at
    start; a reload must say so instead of pretending to apply them."""
    new = Settings(
        edge_preauth_max_connections=5,
        edge_preauth_max_per_source=2,
        edge_handshake_timeout_secs=3.0,
        edge_preauth_park_secs=5.0,
        traffic_sample_interval_secs=60.0,
    )
    changed, restart = diff(Settings(), new)
    assert changed == {}
    assert restart == [
        "edge_handshake_timeout_secs",
        "edge_preauth_max_connections",
        "edge_preauth_max_per_source",
        "edge_preauth_park_secs",
        "traffic_sample_interval_secs",
    ]


def test_every_reloadable_key_is_a_setting() -> None:
    assert RELOADABLE <= set(vars(Settings()))


def test_reloader_keeps_everything_on_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("udp_max_flows = 5\n")
    live = load_server_settings(str(tmp_path), str(path))
    reloader = SettingsReloader(
        live, lambda: load_server_settings(str(tmp_path), str(path)), str(path)
    )
    path.write_text('udp_max_flows = "many"\n')
    assert reloader.reload() is None and live.udp_max_flows == 5
    path.write_text('udp_max_flows = 9\noperator_http_listen = "127.0.0.1:1"\n')
    assert reloader.reload() == {"udp_max_flows": 9}
    assert live.udp_max_flows == 9 and live.operator_http_listen == "127.0.0.1:7080"
    with pytest.raises(ConfigError):
        load_server_settings(str(tmp_path), str(tmp_path / "missing.toml"))
