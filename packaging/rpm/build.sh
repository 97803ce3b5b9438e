#!/bin/sh
# Assemble and build the .rpm from the staged tree with rpmbuild.
# Usage: build.sh STAGE WORKDIR OUT.rpm VERSION MAINTAINER
set -eu
stage=$1; work=$2; out=$3; version=$4; maintainer=$5
here=$(cd "$(dirname "$0")" && pwd)
pkg=$here/..
rm -rf "$work"; mkdir -p "$work/root" "$work/top"
work=$(cd "$work" && pwd)
root=$work/root
cp -a "$stage/." "$root/"

install -d "$root/usr/lib/systemd/system" "$root/var/lib/portunus" "$root/var/lib/portunus-client"
install -m 0644 "$pkg"/systemd/*.service "$root/usr/lib/systemd/system/"
# rpmbuild warns on absolute symlinks (Debian policy wants them absolute across
# top-level directories, so only the rpm gets relative ones).
for s in portunus-server portunus-client portunus-standalone; do
    ln -sfn "../../opt/portunus/bin/$s" "$root/usr/bin/$s"
done
install -d "$root/usr/share/doc/portunus"
install -m 0644 "$pkg/README.md" "$root/usr/share/doc/portunus/README.packaging.md"
sh "$pkg/scripts/copyright.sh" "$root/opt/portunus" > "$root/usr/share/doc/portunus/copyright"
# rpm packages own their byte code (removed with the package); checked hashes so a
# stale .pyc is never used and nothing is written at run time.
/usr/bin/python3.11 -m compileall -q -j 0 --invalidation-mode checked-hash -s "$root" -p / \
    "$root/opt/portunus/lib/python3.11/site-packages" >/dev/null

sysusers=$(grep -v '^#' "$pkg/sysusers/portunus.conf" | grep -v '^$')
awk -v setup="$pkg/scripts/setup.sh" -v users="$sysusers" -v ver="$version" \
    -v who="$maintainer" -v root="$root" '
    $0 == "#SETUP#" {
        while ((getline l < setup) > 0) print (l == "@SYSUSERS@" ? users : l)
        close(setup); next
    }
    { gsub("@VERSION@", ver); gsub("@MAINTAINER@", who); gsub("@ROOT@", root); print }
' "$here/portunus.spec.in" > "$work/portunus.spec"

rpmbuild -bb --quiet \
    --define "_topdir $work/top" \
    --define "_rpmdir $work/out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    "$work/portunus.spec"
mkdir -p "$(dirname "$out")"
mv "$work/out/$(basename "$out")" "$out"
echo "built $out"
