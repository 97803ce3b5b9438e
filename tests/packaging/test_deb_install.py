"""The .deb in a booted Debian 12 container: install, first run, the three units
under a real systemd, upgrade, remove and purge.

One container for the module, used in file order like an operator would: the
install test comes first, remove/purge last.  Every network use is on the
container's own loopback (it has no other interface).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator

import pytest
from machine import Machine, Packages

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

PROBE = ("python3.11", "/mnt/probe/probe.py")  # the container's python, not the package's
UNITS = ("portunus.service", "portunus-client.service", "portunus-standalone.service")
NEXT_STEPS = (
    "Portunus installed. Start it:  systemctl enable --now portunus",
    "Operator token: /etc/portunus/operator.token",
    "First rule:     portunus-server push-rule local 18080 127.0.0.1:8080   (as root or a member of group portunus)",
)
MAX_EXPOSURE = 2.0


@pytest.fixture(scope="module")
def vm(boot: Callable[[str], Machine]) -> Iterator[Machine]:
    yield boot("deb")


@pytest.fixture(scope="module")
def echo_port(vm: Machine) -> int:
    """A TCP echo origin inside the container, as a transient unit."""
    port = int(vm.run(*PROBE, "freeport").stdout)
    vm.run("systemd-run", "--unit=test-echo", "--quiet", *PROBE, "echo", str(port))
    vm.run(*PROBE, "wait", str(port))
    return port


def free_port(vm: Machine) -> int:
    return int(vm.run(*PROBE, "freeport").stdout)


def roundtrip(vm: Machine, port: int, size: int = 1 << 20) -> dict[str, object]:
    res = vm.run(*PROBE, "roundtrip", str(port), str(size), check=False)
    return json.loads(res.stdout) if res.stdout.strip() else {"ok": False, "error": res.stderr}


def active(vm: Machine, unit: str) -> str:
    return vm.run("systemctl", "is-active", unit, check=False).stdout.strip()


def test_container_has_only_loopback(vm: Machine) -> None:
    assert vm.run("ls", "/sys/class/net").stdout.split() == ["lo"]


def test_install_first_run(vm: Machine, packages: Packages) -> None:
    res = vm.run(
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        f"/mnt/pkgs/{packages.deb.name}",
        timeout=300,
    )
    out = res.stdout + res.stderr
    for line in NEXT_STEPS:
        assert line in out, out[-2000:]
    passwd = vm.run("getent", "passwd", "portunus").stdout.strip().split(":")
    assert passwd[5] == "/var/lib/portunus" and passwd[6] in ("/usr/sbin/nologin", "/sbin/nologin")
    assert int(passwd[2]) < 1000  # a system user
    assert vm.stat("/etc/portunus") == ("755", "root", "root")
    assert vm.stat("/etc/portunus/server.toml") == ("644", "root", "root")
    assert vm.stat("/etc/portunus/operator.token") == ("640", "root", "portunus")
    token = vm.run("cat", "/etc/portunus/operator.token").stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert vm.stat("/var/lib/portunus") == ("750", "portunus", "portunus")
    # serve and the CLI both look in the data dir first: it points at the same token.
    assert (
        vm.run("readlink", "/var/lib/portunus/operator.token").stdout.strip()
        == "/etc/portunus/operator.token"
    )
    assert (
        vm.run("cat", "/var/lib/portunus/operator.token", user="portunus").stdout.strip() == token
    )
    # Byte-compiled at configure time with checked hashes (PEP 552 flags 0b11).
    flags = vm.run(
        "python3.11",
        "-c",
        "import glob;p=glob.glob('/opt/portunus/lib/python3.11/site-packages/portunus/"
        "__pycache__/config.*.pyc')[0];print(int.from_bytes(open(p,'rb').read()[4:8],'little'))",
    )
    assert flags.stdout.strip() == "3"
    version = vm.run("portunus-standalone", "--version", user="portunus").stdout
    assert packages.version.replace("~", "") in version.replace("~", "")
    # Nothing started or enabled on a first install: the operator decides.
    for unit in UNITS:
        assert active(vm, unit) == "inactive"
        assert vm.run("systemctl", "is-enabled", unit, check=False).stdout.strip() == "disabled"


def test_client_unit_says_it_needs_enrollment(vm: Machine) -> None:
    """Without /etc/portunus/client.bundle the edge unit does not start, visibly: the
    start fails and `systemctl status` names the missing file (no silent skip)."""
    res = vm.run("systemctl", "start", "portunus-client.service", check=False)
    assert res.returncode != 0, res.stdout + res.stderr
    props = vm.show("portunus-client.service", "ActiveState", "AssertResult")
    assert props == {"ActiveState": "inactive", "AssertResult": "no"}, props
    status = vm.run("systemctl", "status", "portunus-client.service", check=False).stdout
    assert "Assertion failed" in status and "needs /etc/portunus/client.bundle" in status, status


def test_units_verify_clean_and_exposure(vm: Machine) -> None:
    res = vm.run("systemd-analyze", "verify", *UNITS, check=False)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr
    for unit in UNITS:
        out = vm.run("systemd-analyze", "security", "--no-pager", unit).stdout
        m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", out)
        assert m, out[-500:]
        print(f"{unit}: exposure {m.group(1)}")
        assert float(m.group(1)) <= MAX_EXPOSURE, out


def _standalone_toml(listen: int, target: int, metrics: int, extra: str = "") -> str:
    return (
        f'metrics_listen = "127.0.0.1:{metrics}"\nlisten_address = "127.0.0.1"\n'
        f"shards = 2\nshutdown_drain_timeout_secs = 5\n\n"
        f'[[rule]]\nname = "echo"\nlisten_port = {listen}\ntarget = "127.0.0.1:{target}"\n{extra}'
    )


def test_standalone_service(vm: Machine, echo_port: int) -> None:
    unit = "portunus-standalone.service"
    fwd, fwd2, metrics = free_port(vm), free_port(vm), free_port(vm)
    vm.write("/etc/portunus/standalone.toml", _standalone_toml(fwd, echo_port, metrics))
    # A short watchdog proves the supervisor pings: without WATCHDOG=1 every 1 s,
    # systemd would kill and restart it within the wait below.
    vm.write(f"/etc/systemd/system/{unit}.d/test-watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    vm.run("systemctl", "daemon-reload")
    try:
        vm.run("systemctl", "start", unit, timeout=60)
        assert active(vm, unit) == "active", vm.journal(unit)
        # Type=notify: "active" means every rule is bound; no retry needed.
        assert roundtrip(vm, fwd)["ok"], vm.journal(unit)
        props = vm.show(unit, "MainPID", "User", "StatusText")
        assert "1 rule" in props["StatusText"]
        assert vm.run("stat", "-c", "%U", f"/proc/{props['MainPID']}").stdout.strip() == "portunus"

        # Reload: add a rule; the open connection survives, the new rule works.
        vm.write(
            "/etc/portunus/standalone.toml",
            _standalone_toml(
                fwd,
                echo_port,
                metrics,
                f'\n[[rule]]\nname = "echo2"\nlisten_port = {fwd2}\ntarget = "127.0.0.1:{echo_port}"\n',
            ),
        )
        held = json.loads(
            vm.run(*PROBE, "hold", str(fwd), "--", "systemctl", "reload", unit).stdout
        )
        assert held == {
            **held,
            "before": True,
            "command_rc": 0,
            "same_connection_after": True,
            "new_connection_after": True,
        }, held
        vm.wait_for("the reloaded rule", lambda: roundtrip(vm, fwd2, 4096)["ok"])
        # A broken file fails the reload visibly and leaves the running rules alone.
        vm.write("/etc/portunus/standalone.toml", "[[rule]]\nname = 1\n")
        assert vm.run("systemctl", "reload", unit, check=False).returncode != 0
        assert active(vm, unit) == "active" and roundtrip(vm, fwd2, 4096)["ok"]

        # Survived several watchdog periods with the same main process.
        before = vm.show(unit, "MainPID", "WatchdogTimestampMonotonic")
        vm.wait_for(
            "a watchdog ping",
            lambda: (
                vm.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
                != before["WatchdogTimestampMonotonic"]
            ),
            timeout=5,
        )
        after = vm.show(unit, "MainPID", "NRestarts", "ActiveState")
        assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == "0", vm.journal(unit)

        vm.run("systemctl", "stop", unit, timeout=90)
        props = vm.show(unit, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
            vm.journal(unit)
        )
        assert not vm.exists("/run/portunus-standalone")
        assert not roundtrip(vm, fwd, 16)["ok"]
    finally:
        vm.run("rm", "-rf", f"/etc/systemd/system/{unit}.d")
        vm.run("systemctl", "daemon-reload")
        vm.run("systemctl", "stop", unit, check=False)


def test_upgrade_keeps_token_and_restarts_running_units(
    vm: Machine, packages: Packages, echo_port: int
) -> None:
    """A newer package over a running service: token kept, unit restarted onto
    the new files by postinst, forwarding again."""
    unit = "portunus-standalone.service"
    fwd, metrics = free_port(vm), free_port(vm)
    vm.write("/etc/portunus/standalone.toml", _standalone_toml(fwd, echo_port, metrics))
    vm.run("systemctl", "start", unit, timeout=60)
    pid = vm.show(unit, "MainPID")["MainPID"]
    token = vm.run("cat", "/etc/portunus/operator.token").stdout
    newer = f"{packages.version}+test1"
    vm.sh(f"""rm -rf /tmp/up; dpkg-deb -R /mnt/pkgs/{packages.deb.name} /tmp/up
              sed -i 's/^Version: .*/Version: {newer}/' /tmp/up/DEBIAN/control
              dpkg-deb --root-owner-group -b /tmp/up /tmp/portunus-newer.deb >/dev/null""")
    try:
        out = vm.run("apt-get", "install", "-y", "/tmp/portunus-newer.deb", timeout=300)
        assert "Portunus installed" not in out.stdout  # next steps only on a first install
        assert vm.run("dpkg-query", "-W", "-f", "${Version}", "portunus").stdout == newer
        assert vm.run("cat", "/etc/portunus/operator.token").stdout == token
        vm.wait_for(
            "the restarted unit",
            lambda: (
                active(vm, unit) == "active"
                and vm.show(unit, "MainPID")["MainPID"] not in (pid, "0")
            ),
            timeout=60,
        )
        assert vm.run("cat", "/etc/portunus/standalone.toml").stdout.startswith(
            'metrics_listen = "127.0.0.1:'
        )
        assert roundtrip(vm, fwd)["ok"], vm.journal(unit)
    finally:
        vm.run("systemctl", "stop", unit, check=False)


def test_no_refused_connection_across_reload_restart_and_upgrade(
    vm: Machine, packages: Packages, echo_port: int
) -> None:
    """The fd store (FileDescriptorStoreMax=, PORTUNUS_FDSTORE=1) keeps every listener
    across `systemctl restart` and the restart of a package upgrade: a connect loop
    through each operation sees no refused connection."""
    unit = "portunus-standalone.service"
    fwd, metrics = free_port(vm), free_port(vm)
    vm.write("/etc/portunus/standalone.toml", _standalone_toml(fwd, echo_port, metrics))
    vm.run("systemctl", "start", unit, timeout=60)
    newer = f"{packages.version}+test2"
    vm.sh(f"""rm -rf /tmp/up2; dpkg-deb -R /mnt/pkgs/{packages.deb.name} /tmp/up2
              sed -i 's/^Version: .*/Version: {newer}/' /tmp/up2/DEBIAN/control
              dpkg-deb --root-owner-group -b /tmp/up2 /tmp/portunus-newer2.deb >/dev/null""")
    try:
        for cmd in (
            ["systemctl", "reload", unit],
            ["systemctl", "restart", unit],
            ["apt-get", "install", "-y", "/tmp/portunus-newer2.deb"],
        ):
            pid = vm.show(unit, "MainPID")["MainPID"]
            res = json.loads(vm.run(*PROBE, "loop", str(fwd), "--", *cmd, timeout=400).stdout)
            assert res["command_rc"] == 0, res
            assert res["refused"] == 0 and res["other"] == [] and res["ok"] > 0, (
                cmd,
                res,
                vm.journal(unit),
            )
            if cmd[1] != "reload":
                assert vm.show(unit, "MainPID")["MainPID"] != pid, cmd  # it did restart
    finally:
        vm.run("systemctl", "stop", unit, check=False)


def _cli(vm: Machine, *args: str, user: str = "portunus", check: bool = True):  # type: ignore[no-untyped-def]
    return vm.run("portunus-server", *args, user=user, check=check, timeout=60)


def test_server_service(vm: Machine, echo_port: int) -> None:
    """The issue's path: start -> active once the API answers -> push a rule with
    the CLI -> bytes -> reload keeps a connection -> restart keeps the rule."""
    unit = "portunus.service"
    fwd = free_port(vm)
    res = vm.run("systemctl", "start", unit, check=False, timeout=120)
    assert res.returncode == 0, (
        f"systemctl start portunus failed:\n{res.stderr}\n{vm.journal(unit)}"
    )
    try:
        assert active(vm, unit) == "active"
        # Type=notify: the API answers the moment start returns, without a retry.
        health = vm.run(
            "python3.11",
            "-c",
            "import urllib.request;print(urllib.request.urlopen("
            "'http://127.0.0.1:7080/v1/health',timeout=5).read().decode())",
            check=False,
        )
        assert health.returncode == 0 and json.loads(health.stdout) == {"status": "ok"}, (
            health.stderr + vm.journal(unit)
        )
        assert vm.stat("/run/portunus/control.sock") == ("660", "portunus", "portunus")
        # serve adopted the installed token instead of writing its own.
        assert (
            vm.run("readlink", "/var/lib/portunus/operator.token").stdout.strip()
            == "/etc/portunus/operator.token"
        )

        pushed = _cli(
            vm,
            "push-rule",
            "local",
            str(fwd),
            f"127.0.0.1:{echo_port}",
            "--format",
            "json",
            check=False,
        )
        assert pushed.returncode == 0, pushed.stderr + vm.journal(unit)
        rule = json.loads(pushed.stdout)
        assert rule["state"] == "active" and rule["listen_port"] == fwd
        assert roundtrip(vm, fwd)["ok"], vm.journal(unit)

        # Any member of group portunus may drive it (token file + socket by group).
        vm.run("useradd", "-m", "-G", "portunus", "alice")
        listed = json.loads(_cli(vm, "list-rules", "--format", "json", user="alice").stdout)
        assert [r["id"] for r in listed["rules"]] == [rule["id"]]

        held = json.loads(
            vm.run(*PROBE, "hold", str(fwd), "--", "systemctl", "reload", unit).stdout
        )
        assert (
            held["command_rc"] == 0
            and held["same_connection_after"]
            and held["new_connection_after"]
        ), held

        # The offline storage verbs are for root or the service user; a group member is
        # told so (state.db is 0600), root may.
        denied_backup = _cli(vm, "backup", "--out", "/tmp/alice.db", user="alice", check=False)
        assert denied_backup.returncode == 9, denied_backup.stderr
        assert "runuser -u portunus -- portunus-server backup" in denied_backup.stderr
        assert _cli(vm, "backup", "--out", "/tmp/root.db", user="root", check=False).returncode == 0

        # A restart refuses no connection on the forwarded port (fd store).
        looped = json.loads(
            vm.run(*PROBE, "loop", str(fwd), "--", "systemctl", "restart", unit, timeout=300).stdout
        )
        assert looped["command_rc"] == 0 and looped["refused"] == 0 and looped["other"] == [], (
            looped,
            vm.journal(unit),
        )
        assert active(vm, unit) == "active"
        listed = json.loads(_cli(vm, "list-rules", "--format", "json").stdout)
        assert [(r["id"], r["state"]) for r in listed["rules"]] == [(rule["id"], "active")]
        assert roundtrip(vm, fwd)["ok"], vm.journal(unit)
        assert vm.show(unit, "NRestarts")["NRestarts"] == "0"

        # Anyone outside group portunus can read no token: exit 4 (unauthenticated),
        # saying who may; with a token of their own, the socket is still closed to them.
        vm.run("useradd", "-m", "bob")
        denied = _cli(vm, "list-rules", user="bob", check=False)
        assert denied.returncode == 4, f"exit {denied.returncode}: {denied.stderr}"
        assert "permission denied on /var/lib/portunus/operator.token" in denied.stderr, (
            denied.stderr
        )
        assert "member of group portunus (`usermod -aG portunus bob`" in denied.stderr, (
            denied.stderr
        )
        no_socket = vm.run(
            "env",
            "PORTUNUS_OPERATOR_TOKEN=not-the-token",
            "portunus-server",
            "list-rules",
            user="bob",
            check=False,
        )
        assert no_socket.returncode == 1, no_socket.stderr
        assert "may not open the control socket /run/portunus/control.sock" in no_socket.stderr
        assert "member of group portunus" in no_socket.stderr, no_socket.stderr

        vm.run("systemctl", "stop", unit, timeout=90)
        assert vm.show(unit, "Result")["Result"] == "success", vm.journal(unit)
        assert vm.exists("/var/lib/portunus/state.db")

        # The journal of the three runs (start, reload, restart): uvicorn's lines once
        # per web process (it runs two servers), and no chown of control.sock tried
        # under the system-call filter (its group is already right).
        journal = vm.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout
        starts = journal.count('"event":"web.listening"')
        assert starts >= 2 and journal.count("Started server process") == starts, journal[-3000:]
        assert "control.socket_group" not in journal, journal[-3000:]
    finally:
        vm.run("systemctl", "stop", unit, check=False)


def test_remove_keeps_state_then_purge_removes_it(vm: Machine) -> None:
    vm.run("systemctl", "enable", "portunus.service")
    vm.run("apt-get", "remove", "-y", "portunus", timeout=300)
    for path in ("/etc/portunus/server.toml", "/etc/portunus/operator.token", "/var/lib/portunus"):
        assert vm.exists(path), path
    assert not vm.exists("/opt/portunus"), vm.run("find", "/opt/portunus", check=False).stdout[
        :2000
    ]
    assert not vm.exists("/usr/bin/portunus-server")
    assert vm.run("systemctl", "cat", "portunus.service", check=False).returncode != 0
    assert (
        "rc" == vm.run("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "portunus").stdout.strip()
    )

    vm.run("apt-get", "purge", "-y", "portunus", timeout=300)
    for path in (
        "/etc/portunus",
        "/var/lib/portunus",
        "/var/lib/portunus-client",
        "/etc/systemd/system/multi-user.target.wants/portunus.service",
    ):
        assert not vm.exists(path), path
    assert vm.run("dpkg-query", "-W", "portunus", check=False).returncode != 0
    # The system user stays (files elsewhere may still belong to it), as documented.
    assert vm.run("getent", "passwd", "portunus", check=False).returncode == 0
