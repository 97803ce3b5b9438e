#!/bin/sh
# Build the staged tree both packages are made from:
#   STAGE/opt/portunus        a venv against the distribution's python3.11 holding
#                             portunus and its dependencies (manylinux wheels only)
#   STAGE/usr/bin/portunus-*  symlinks to its console scripts
#   STAGE/etc/portunus/*.toml commented server.toml, sample standalone.toml
#   STAGE/usr/lib/sysusers.d/portunus.conf
#   STAGE/usr/share/man/man1, bash-completion, zsh, fish: from the click commands
#   STAGE/usr/share/doc/portunus/reference/*.md, STAGE/usr/share/portunus/monitoring
# Extension modules are stripped; no byte code yet (each format compiles its own).
# Usage: stage.sh TOPDIR STAGE WHEELDIR PIP...
# PIP is a pip >= 22.3 command (for --python); the checkout's .venv has one.
set -eu
# The caller's import path must not leak into the target venv: with PYTHONPATH at a
# checkout (holding portunus.egg-info) pip would call portunus "already installed"
# and stage a venv without it.
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE
top=$(cd "$1" && pwd); stage=$2; wheels=$3; shift 3
py=/usr/bin/python3.11   # the distribution's interpreter, never whatever is on PATH
prefix=/opt/portunus
here=$(cd "$(dirname "$0")/.." && pwd)

rm -rf "$stage" "$wheels"
mkdir -p "$stage/opt" "$wheels"
stage=$(cd "$stage" && pwd)
venv=$stage$prefix

# The project's own wheel first (Python plus the native relay, compiled here: needs
# gcc and the python3.11 headers), then everything else as binary wheels; manylinux
# wheels keep the rpm usable off Debian.
"$@" wheel --quiet --no-deps --wheel-dir "$wheels" "$top"
$py -m venv --without-pip "$venv"
"$@" --python "$venv/bin/python" install --quiet --no-compile --only-binary=:all: \
    --no-warn-script-location --disable-pip-version-check "$wheels"/portunus-*.whl
# The extension is optional for a checkout, not for a package.
if ! ls "$venv"/lib/python3.11/site-packages/portunus/shard/_relay.*.so >/dev/null 2>&1; then
    echo "stage.sh: the native relay (portunus/shard/_relay.c) was not built: install gcc and python3.11-dev" >&2
    exit 1
fi

# Console scripts carry the staging path in their shebang: point them at the final
# prefix.  Only regular files: bin/python* are symlinks to /usr/bin/python3.11.
find "$venv/bin" -type f | while read -r f; do
    if head -n1 "$f" | grep -q "^#!$venv/bin/python"; then
        sed -i "1s|^#!$venv/bin/python.*|#!$prefix/bin/python3.11|" "$f"
    fi
done
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
rmdir "$venv/include/python3.11" "$venv/include"   # headers dir venv makes; empty
sed -i "s|^command = .*|command = $py -m venv --without-pip $prefix|" "$venv/pyvenv.cfg"
# Build-machine paths and pip's bookkeeping have no business on the target.
find "$venv" -name direct_url.json -path '*.dist-info/*' -delete
find "$venv" -name '__pycache__' -type d -prune -exec rm -rf {} +
if grep -rIl -- "$stage" "$venv" >/dev/null 2>&1; then
    echo "stage.sh: staging path left in:" >&2; grep -rIl -- "$stage" "$venv" >&2; exit 1
fi

# Debug symbols are of no use on the target (what dh_strip does for Debian's own
# packages); the wheels ship them unstripped.
find "$venv" -name '*.so*' -type f -exec strip --strip-unneeded \
    --remove-section=.comment --remove-section=.note {} +

# No byte code in the stage: the .deb compiles at configure time (postinst, like
# Debian's own Python packages), the .rpm compiles into its payload (rpm/build.sh).

mkdir -p "$stage/usr/bin" "$stage/etc/portunus" "$stage/usr/lib/sysusers.d"
for s in portunus-server portunus-client portunus-standalone; do
    test -x "$venv/bin/$s" || { echo "stage.sh: $s missing from the venv" >&2; exit 1; }
    ln -sf "$prefix/bin/$s" "$stage/usr/bin/$s"
done
install -m 0644 "$here/etc/server.toml" "$here/etc/standalone.toml" "$stage/etc/portunus/"
install -m 0644 "$here/sysusers/portunus.conf" "$stage/usr/lib/sysusers.d/portunus.conf"

# Man pages and bash/zsh/fish completion, rendered from the click commands by the
# staged interpreter (-B: no byte code in the stage); the reference docs; the
# Grafana dashboard and Prometheus alert rules.
share=$stage/usr/share
"$venv/bin/python" -B "$here/scripts/clidoc.py" man "$share/man/man1"
gzip -9n "$share"/man/man1/*.1
"$venv/bin/python" -B "$here/scripts/clidoc.py" completion "$share"
install -d "$share/doc/portunus/reference" "$share/portunus/monitoring"
install -m 0644 "$top"/docs/reference/*.md "$share/doc/portunus/reference/"
install -m 0644 "$here/monitoring/portunus-dashboard.json" "$here/monitoring/portunus-alerts.yml" \
    "$share/portunus/monitoring/"
# Files must not depend on the builder's umask.
chmod -R u+rwX,go+rX,go-w "$stage"
