# Shared first-run steps of the .deb postinst and the .rpm %pre/%post (POSIX sh).
# Inlined into both at build time, so one copy decides users, modes and the token.

portunus_user() {
    # One sysusers.d file serves both formats (inlined here, as the %pre of an
    # rpm runs before the file is on disk); useradd where systemd-sysusers is
    # missing or too old for --replace (< 250).  Never removed: files elsewhere
    # may still belong to the user.
    if getent passwd portunus >/dev/null 2>&1; then
        return 0
    fi
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers --replace=/usr/lib/sysusers.d/portunus.conf - <<'SYSUSERS' || :
@SYSUSERS@
SYSUSERS
    fi
    if ! getent passwd portunus >/dev/null 2>&1; then
        getent group portunus >/dev/null 2>&1 || groupadd --system portunus
        useradd --system --gid portunus --home-dir /var/lib/portunus --no-create-home \
            --shell /usr/sbin/nologin --comment "Portunus port forwarder" portunus
    fi
}

portunus_dirs() {
    # Created here (not only by StateDirectory=) so the CLI works before the first
    # start.  Existing directories keep whatever modes the operator gave them.
    [ -d /etc/portunus ] || install -d -m 0755 -o root -g root /etc/portunus
    for d in /var/lib/portunus /var/lib/portunus-client; do
        [ -d "$d" ] || install -d -m 0750 -o portunus -g portunus "$d"
    done
}

portunus_token() {
    # The operator token: root-owned so the service cannot rewrite its own
    # credential, readable by group portunus so root, the portunus user and members
    # of the group need no environment variable.
    token=/etc/portunus/operator.token
    if [ ! -e "$token" ]; then
        (umask 077 && /opt/portunus/bin/python3.11 -c \
            'import secrets; print(secrets.token_urlsafe(32))' > "$token.new")
        chown root:portunus "$token.new"
        chmod 0640 "$token.new"
        mv -f "$token.new" "$token"
    fi
    # portunus-server serve reads <data-dir>/operator.token and writes one only if
    # none exists; the CLI looks there first too.  Point it at the same file so the
    # server and the CLI agree on one token.  A real file there (an earlier
    # install, or one the operator put there) is left alone.
    if [ ! -e /var/lib/portunus/operator.token ] && [ ! -L /var/lib/portunus/operator.token ]; then
        ln -s "$token" /var/lib/portunus/operator.token
    fi
}

portunus_token_path() {
    if [ -L /var/lib/portunus/operator.token ] || [ ! -e /var/lib/portunus/operator.token ]; then
        echo /etc/portunus/operator.token
    else
        echo /var/lib/portunus/operator.token
    fi
}

portunus_next_steps() {
    echo "Portunus installed. Start it:  systemctl enable --now portunus"
    echo "Operator token: $(portunus_token_path) (readable by root and group portunus; the CLI finds it)"
    # Root, or a member of group portunus (usermod -aG portunus NAME), runs the CLI
    # as is: no privilege-escalation tool needed (minimal systems have none).
    echo "First rule:     portunus-server push-rule local 18080 127.0.0.1:8080   (as root or a member of group portunus)"
}

portunus_compile() {
    # Byte code with checked hashes: nothing is written at run time (the units run
    # with ProtectSystem=strict), and a stale .pyc is never used, whatever order
    # the package manager runs scripts in during an upgrade.
    /opt/portunus/bin/python3.11 -m compileall -q -f -j 0 --invalidation-mode checked-hash \
        /opt/portunus/lib/python3.11/site-packages >/dev/null
}

portunus_uncompile() {
    find /opt/portunus -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || :
}

portunus_units="portunus.service portunus-client.service portunus-standalone.service"

portunus_systemd() {
    # portunus_systemd [VERB]: daemon-reload, then VERB (stop, try-restart) on our
    # units; only when systemd runs (not in a chroot or an image build).
    [ -d /run/systemd/system ] || return 0
    systemctl daemon-reload || :
    [ -n "${1:-}" ] || return 0
    if command -v deb-systemd-invoke >/dev/null 2>&1; then
        deb-systemd-invoke "$1" $portunus_units >/dev/null || :
    else
        systemctl "$1" $portunus_units >/dev/null 2>&1 || :
    fi
}
