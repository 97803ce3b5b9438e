"""The built .deb and .rpm as files: metadata, contents, scripts, lintian, and the
rpm unpacked into a temporary rpm root.  No container needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from machine import REPO, Packages

from portunus.cli.client import EXIT_REVOKED
from portunus.config import Settings, load_standalone

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

UNITS = ("portunus.service", "portunus-client.service", "portunus-standalone.service")
SCRIPTS = ("portunus-server", "portunus-client", "portunus-standalone")
CONFFILES = ["/etc/portunus/server.toml", "/etc/portunus/standalone.toml"]
# Shipped beside the programs: man pages, shell completion, the reference, and the
# Grafana dashboard + Prometheus alert rules.
EXTRAS = (
    *(f"/usr/share/man/man1/{s}.1.gz" for s in SCRIPTS),
    *(f"/usr/share/bash-completion/completions/{s}" for s in SCRIPTS),
    *(f"/usr/share/zsh/vendor-completions/_{s}" for s in SCRIPTS),
    *(f"/usr/share/fish/vendor_completions.d/{s}.fish" for s in SCRIPTS),
    *(
        f"/usr/share/doc/portunus/reference/{p.name}"
        for p in (REPO / "docs/reference").glob("*.md")
    ),
    "/usr/share/portunus/monitoring/portunus-dashboard.json",
    "/usr/share/portunus/monitoring/portunus-alerts.yml",
)


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _deb_listing(deb: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode string, link target or '') from dpkg-deb -c."""
    entries: dict[str, tuple[str, str]] = {}
    for line in _out("dpkg-deb", "-c", str(deb)).splitlines():
        parts = line.split(None, 5)
        name = parts[5]
        target = ""
        if " -> " in name:
            name, target = name.split(" -> ", 1)
        entries[name.removeprefix(".").rstrip("/") or "/"] = (parts[0], target)
    return entries


# ------------------------------------------------------------------ .deb


def test_deb_control_fields(packages: Packages) -> None:
    field = lambda name: _out("dpkg-deb", "-f", str(packages.deb), name).strip()  # noqa: E731
    assert field("Package") == "portunus"
    assert field("Version") == packages.version
    assert field("Architecture") == "amd64"
    depends = [d.strip() for d in field("Depends").split(",")]
    # The venv's interpreter is the distribution's python3.11: the minor version is
    # part of the package name, and nothing else provides /usr/bin/python3.11.
    assert "python3.11" in depends
    assert "passwd" in depends  # useradd, where systemd-sysusers is missing
    assert any(re.fullmatch(r"libc6 \(>= 2\.\d+\)", d) for d in depends), depends


def test_deb_contents(packages: Packages) -> None:
    files = _deb_listing(packages.deb)
    for s in SCRIPTS:
        assert files[f"/usr/bin/{s}"] == ("lrwxrwxrwx", f"/opt/portunus/bin/{s}")
        assert files[f"/opt/portunus/bin/{s}"][0] == "-rwxr-xr-x"
    assert files["/opt/portunus/bin/python3.11"][1] == "/usr/bin/python3.11"
    for u in UNITS:
        assert files[f"/lib/systemd/system/{u}"][0] == "-rw-r--r--"
    assert "/usr/lib/sysusers.d/portunus.conf" in files
    for c in CONFFILES:
        assert files[c][0] == "-rw-r--r--"
    assert "/usr/share/doc/portunus/copyright" in files
    for extra in EXTRAS:
        assert files[extra][0] == "-rw-r--r--", extra
    # Byte code is compiled by postinst, not shipped; no venv activation scripts.
    assert not [f for f in files if f.endswith(".pyc") or "__pycache__" in f]
    assert not [f for f in files if "/bin/activate" in f]
    # Every file is root-owned in the archive (dpkg-deb --root-owner-group).
    owners = {line.split()[1] for line in _out("dpkg-deb", "-c", str(packages.deb)).splitlines()}
    assert owners == {"root/root"}


def test_deb_conffiles_and_scripts(packages: Packages, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(packages.deb), str(tmp_path)], check=True)
    assert (tmp_path / "conffiles").read_text().split() == CONFFILES
    for s in ("postinst", "prerm", "postrm"):
        path = tmp_path / s
        assert path.stat().st_mode & 0o777 == 0o755
        subprocess.run(["sh", "-n", str(path)], check=True)
        assert "#SETUP#" not in path.read_text() and "@SYSUSERS@" not in path.read_text()
    postinst = (tmp_path / "postinst").read_text()
    assert "u portunus - " in postinst  # the sysusers line, inlined
    assert "/etc/portunus/operator.token" in postinst
    # No build-machine path leaked into what runs on the target.
    for s in ("postinst", "prerm", "postrm", "control"):
        assert str(REPO) not in (tmp_path / s).read_text()


def test_deb_lintian_clean(packages: Packages) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed (apt-get install lintian)")
    # Warnings too: every accepted one is overridden with its reason in
    # packaging/deb/lintian-overrides.
    res = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(packages.deb)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------ .rpm


def test_rpm_metadata(packages: Packages) -> None:
    rpm = str(packages.rpm)
    info = _out("rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}", rpm)
    assert info == f"portunus {packages.version} 1 x86_64"
    requires = {r.split()[0] for r in _out("rpm", "-qpR", rpm).splitlines()}
    # AutoReqProv is off: the wheels' private .so files must not become requirements.
    assert "python3.11" in requires
    assert not [r for r in requires if ".so" in r], requires
    assert _out("rpm", "-qpc", rpm).split() == CONFFILES
    files = set(_out("rpm", "-qpl", rpm).split())
    for s in SCRIPTS:
        assert f"/usr/bin/{s}" in files
    for u in UNITS:
        assert f"/usr/lib/systemd/system/{u}" in files
    assert "/usr/lib/sysusers.d/portunus.conf" in files
    assert set(EXTRAS) <= files, sorted(set(EXTRAS) - files)
    assert any(f.endswith(".pyc") for f in files)  # rpm owns its byte code
    scripts = _out("rpm", "-qp", "--scripts", rpm)
    for phase in ("preinstall", "postinstall", "preuninstall", "postuninstall"):
        assert f"{phase} scriptlet" in scripts
    assert "systemd-sysusers --replace=/usr/lib/sysusers.d/portunus.conf" in scripts
    assert "/etc/portunus/operator.token" in scripts
    assert "sudo" not in scripts  # minimal systems have none
    # The systemd macros (or their stand-ins): erase disables the units, so no
    # multi-user.target.wants link is left dangling.
    preun = scripts.split("preuninstall scriptlet", 1)[1].split("postuninstall scriptlet", 1)[0]
    assert "disable --now" in preun or "systemd-update-helper" in preun, preun
    for unit in UNITS:
        assert unit in preun, preun
    for tool in ("/usr/sbin/useradd", "/usr/sbin/groupadd", "/usr/bin/getent"):
        assert tool in requires, requires  # Requires(pre): the user tools


def test_rpm_installs_into_rpm_root(packages: Packages, tmp_path: Path) -> None:
    """File placement and modes as rpm lays them down (scripts run in the booted
    container, see test_rpm_install.py)."""
    root = tmp_path / "root"
    subprocess.run(["rpm", "--root", str(root), "--initdb"], check=True)
    subprocess.run(
        ["rpm", "--root", str(root), "--nodeps", "--noscripts", "-i", str(packages.rpm)],
        check=True,
        capture_output=True,
    )
    mode = lambda p: oct((root / p).lstat().st_mode & 0o7777)  # noqa: E731
    for s in SCRIPTS:
        link = root / "usr/bin" / s
        assert link.is_symlink()
        assert (link.parent / link.readlink()).resolve() == (
            root / "opt/portunus/bin" / s
        ).resolve()
        assert mode(f"opt/portunus/bin/{s}") == "0o755"
        assert (
            (root / "opt/portunus/bin" / s)
            .read_text()
            .startswith("#!/opt/portunus/bin/python3.11\n")
        )
    for u in UNITS:
        assert mode(f"usr/lib/systemd/system/{u}") == "0o644"
    assert mode("etc/portunus") == "0o755"
    assert mode("etc/portunus/server.toml") == "0o644"
    assert mode("var/lib/portunus") == "0o750"
    assert (root / "opt/portunus/bin/python3.11").readlink() == Path("/usr/bin/python3.11")
    # Byte code with checked hashes (PEP 552 flags = 0b11): never stale, never rewritten.
    pyc = next(
        (root / "opt/portunus/lib/python3.11/site-packages/portunus/__pycache__").glob(
            "config.*.pyc"
        )
    )
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b11
    owners = _out("rpm", "-qplv", str(packages.rpm))
    assert re.search(r"^drwxr-x---\s+\d+\s+portunus\s+portunus\s.*/var/lib/portunus$", owners, re.M)


def test_deb_man_pages_and_completion_work(packages: Packages, tmp_path: Path) -> None:
    """The packaged man pages render without a groff warning and name every verb;
    the bash completion asks the installed program for its completions."""
    subprocess.run(["dpkg-deb", "-x", str(packages.deb), str(tmp_path)], check=True)
    man = tmp_path / "usr/share/man/man1/portunus-server.1.gz"
    if shutil.which("man") is not None:
        res = subprocess.run(
            ["man", "--warnings", "-l", str(man)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"},
        )
        assert res.returncode == 0 and res.stderr == "", res.stderr
        for verb in ("push-rule", "list-rules", "remove-rule", "rule-stats", "serve"):
            assert f"portunus-server {verb}" in res.stdout, verb
    bash = (tmp_path / "usr/share/bash-completion/completions/portunus-server").read_text()
    assert "_PORTUNUS_SERVER_COMPLETE=bash_complete" in bash
    assert "complete -o nosort -F _portunus_server_completion portunus-server" in bash


# ------------------------------------------------------------ config files


def _commented_settings(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"#([a-z_]+) = (.*)", line)
        if m:
            assert m.group(1) not in found, f"{m.group(1)} listed twice"
            found[m.group(1)] = m.group(2)
    return found


def test_server_toml_lists_every_setting_with_its_default() -> None:
    text = (REPO / "packaging/etc/server.toml").read_text()
    assert not [ln for ln in text.splitlines() if ln and not ln.startswith("#")], (
        "every line commented"
    )
    listed = _commented_settings(text)
    keys = {f.name for f in fields(Settings)} - {
        "extra",
        "data_dir",
        "runtime_dir",
        "shards",
        "config_path",
    }
    assert set(listed) == keys
    values = tomllib.loads("\n".join(f"{k} = {v}" for k, v in listed.items()))
    defaults = Settings()
    for key, value in values.items():
        expected = getattr(defaults, key)
        if key == "operator_token":
            assert value == "" and expected is None  # "" = unset, like the default
        else:
            assert value == expected, key


def test_standalone_sample_is_valid_as_shipped_and_uncommented(tmp_path: Path) -> None:
    path = REPO / "packaging/etc/standalone.toml"
    _settings, rules = load_standalone(str(path))
    assert rules == []  # ships inert: enabling the unit forwards nothing until edited
    # The commented examples are valid once uncommented (lines "#key", "#[[", "#  {", "#]").
    text = path.read_text().splitlines()
    first_rule = text.index("#[[rule]]")
    lines = [
        re.sub(r"^#(?=\S|  )", "", ln) if i >= first_rule or re.match(r"#\w+ = ", ln) else ln
        for i, ln in enumerate(text)
    ]
    sample = tmp_path / "sample.toml"
    sample.write_text("\n".join(lines) + "\n")
    _settings, rules = load_standalone(str(sample))
    assert [r.id for r in rules] == ["web", "api"]


def test_units_carry_the_contract() -> None:
    for name in UNITS:
        text = (REPO / "packaging/systemd" / name).read_text()
        lines = {ln.strip() for ln in text.splitlines() if ln and not ln.startswith("#")}
        for required in (
            "Type=notify",
            "KillMode=mixed",
            "User=portunus",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectKernelLogs=yes",
            "ProtectControlGroups=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallFilter=@system-service",
            "LimitNOFILE=1048576",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
            "Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1"
            + (" PORTUNUS_RUNTIME_DIR=/run/portunus-client" if "client" in name else ""),
        ):
            assert required in lines, f"{name}: {required}"
        assert "Type=notify-reload" not in text  # systemd 253+; Debian 12 has 252
        no_restart = {
            int(c)
            for c in re.search(r"^RestartPreventExitStatus=(.*)$", text, re.M)  # type: ignore[union-attr]
            .group(1)
            .split()
        }
        assert {2, 70, 78} <= no_restart, name  # usage, a child that cannot start, config
        if name in ("portunus.service", "portunus-standalone.service"):
            # A reload validates first, so a broken file fails `systemctl reload` visibly.
            reloads = re.findall(r"^ExecReload=(.*)$", text, re.M)
            assert len(reloads) == 2 and (
                "check-config" in reloads[0] or "--check" in reloads[0]
            ), name
            assert "kill -HUP" in reloads[1], name
        if "client" in name:  # a revoked client would only be refused again: no restart loop
            assert EXIT_REVOKED in no_restart, name
        assert re.search(r"^WatchdogSec=\d+", text, re.M)
        stop = int(re.search(r"^TimeoutStopSec=(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
        # Drain (30 s default) + the supervisor's grace for shards (5 s) and services (10 s).
        assert stop > Settings().shutdown_drain_timeout_secs + 15, name
