"""The .rpm's scriptlets under a real systemd: `rpm -ivh --nodeps` in a booted
Debian 12 container (Debian's rpm; the dependencies are dpkg's business there),
then a forwarded port through portunus-standalone.service, then `rpm -e`."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from machine import Machine, Packages

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

PROBE = ("python3.11", "/mnt/probe/probe.py")


def test_rpm_install_run_erase(boot: Callable[[str], Machine], packages: Packages) -> None:
    vm = boot("rpm")
    assert vm.run("ls", "/sys/class/net").stdout.split() == ["lo"]
    # The .deb test covers systemd-sysusers; here the scriptlets take the useradd
    # fallback (systemd < 250 has no --replace): hide systemd-sysusers meanwhile.
    sysusers = vm.run("sh", "-c", "command -v systemd-sysusers").stdout.strip()
    vm.run("mv", sysusers, f"{sysusers}.hidden")
    try:
        res = vm.run("rpm", "-ivh", "--nodeps", f"/mnt/pkgs/{packages.rpm.name}", timeout=300)
    finally:
        vm.run("mv", f"{sysusers}.hidden", sysusers)
    assert "Portunus installed. Start it:  systemctl enable --now portunus" in res.stdout
    assert "Creating user" not in res.stdout  # i.e. not systemd-sysusers
    # %pre created the user before the payload, so rpm could apply %attr(portunus).
    passwd = vm.run("getent", "passwd", "portunus").stdout.strip().split(":")
    assert int(passwd[2]) < 1000 and passwd[5:] == ["/var/lib/portunus", "/usr/sbin/nologin"], (
        passwd
    )
    assert vm.stat("/var/lib/portunus") == ("750", "portunus", "portunus")
    assert vm.stat("/etc/portunus/operator.token") == ("640", "root", "portunus")
    # Files as shipped (--nodeps: the dependencies are in dpkg's database here).
    assert vm.run("rpm", "-V", "--nodeps", "portunus", check=False).stdout.strip() == ""
    out = vm.run(
        "systemd-analyze",
        "verify",
        "portunus.service",
        "portunus-standalone.service",
        "portunus-client.service",
        check=False,
    )
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr

    echo, fwd, metrics = (int(vm.run(*PROBE, "freeport").stdout) for _ in range(3))
    vm.run("systemd-run", "--unit=test-echo", "--quiet", *PROBE, "echo", str(echo))
    vm.run(*PROBE, "wait", str(echo))
    vm.write(
        "/etc/portunus/standalone.toml",
        f'metrics_listen = "127.0.0.1:{metrics}"\nlisten_address = "127.0.0.1"\nshards = 1\n'
        f'[[rule]]\nname = "echo"\nlisten_port = {fwd}\ntarget = "127.0.0.1:{echo}"\n',
    )
    vm.run("systemctl", "enable", "--now", "portunus-standalone", timeout=60)
    wants = "/etc/systemd/system/multi-user.target.wants/portunus-standalone.service"
    assert vm.exists(wants)
    result = json.loads(vm.run(*PROBE, "roundtrip", str(fwd), str(1 << 20), check=False).stdout)
    assert result["ok"], vm.journal("portunus-standalone.service")

    # %preun (%systemd_preun) stops and disables the units on erase: no enablement
    # link is left pointing at a removed unit file.  State and the token stay.
    vm.run("rpm", "-e", "portunus", timeout=120)
    assert (
        vm.run("systemctl", "is-active", "portunus-standalone", check=False).stdout.strip()
        == "inactive"
    )
    assert not vm.exists(wants), "rpm -e left a dangling multi-user.target.wants link"
    assert not vm.exists("/opt/portunus/bin") and not vm.exists(
        "/usr/lib/systemd/system/portunus.service"
    )
    assert vm.exists("/var/lib/portunus") and vm.exists("/etc/portunus/operator.token")
    # The edited config is kept as .rpmsave (%config(noreplace)).
    assert vm.exists("/etc/portunus/standalone.toml.rpmsave")
