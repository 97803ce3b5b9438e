#!/bin/sh
# Assemble and build the .deb from the staged tree.
# Usage: build.sh STAGE WORKDIR OUT.deb VERSION MAINTAINER
set -eu
stage=$1; work=$2; out=$3; version=$4; maintainer=$5
here=$(cd "$(dirname "$0")" && pwd)
pkg=$here/..
root=$work/root

rm -rf "$work"; mkdir -p "$root"
cp -a "$stage/." "$root/"

# Debian 12 keeps units in /lib/systemd/system (usrmerge is not assumed by dpkg).
install -d "$root/lib/systemd/system"
install -m 0644 "$pkg"/systemd/*.service "$root/lib/systemd/system/"

doc=$root/usr/share/doc/portunus
install -d "$doc" "$root/usr/share/lintian/overrides"
install -m 0644 "$pkg/README.md" "$doc/README.packaging.md"
sh "$pkg/scripts/copyright.sh" "$root/opt/portunus" > "$doc/copyright"
date=$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")
printf 'portunus (%s) unstable; urgency=medium\n\n  * Upstream release %s, packaged from the Portunus tree.\n\n -- %s  %s\n' \
    "$version" "$version" "$maintainer" "$date" | gzip -9n > "$doc/changelog.gz"
install -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/portunus"

# Highest glibc symbol version the bundled extension modules need.
libc=$(find "$root/opt/portunus" -name '*.so*' -type f -exec objdump -T {} + 2>/dev/null \
    | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
libc="libc6 (>= ${libc:-2.17})"

install -d -m 0755 "$root/DEBIAN"
# Maintainer scripts: the shared setup.sh inlined at #SETUP#, the sysusers line at
# @SYSUSERS@, so the .deb and the .rpm run the same first-run steps.
sysusers=$(grep -v '^#' "$pkg/sysusers/portunus.conf" | grep -v '^$')
for s in postinst prerm postrm; do
    awk -v setup="$pkg/scripts/setup.sh" -v users="$sysusers" '
        $0 == "#SETUP#" { while ((getline l < setup) > 0) print (l == "@SYSUSERS@" ? users : l); next }
        { print }' "$here/$s" > "$root/DEBIAN/$s"
    chmod 0755 "$root/DEBIAN/$s"
    sh -n "$root/DEBIAN/$s"
done
install -m 0644 "$here/conffiles" "$root/DEBIAN/conffiles"

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort \
    | xargs -d '\n' md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@MAINTAINER@|$maintainer|" -e "s|@SIZE@|$size|" \
    -e "s|@LIBC@|$libc|" "$here/control.in" > "$root/DEBIAN/control"

mkdir -p "$(dirname "$out")"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "built $out"
