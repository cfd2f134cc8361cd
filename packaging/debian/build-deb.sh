#!/usr/bin/env bash
# Builds the Debian package osync_VERSION_all.deb with dpkg-deb alone (no debhelper, no
# network, no root: --root-owner-group makes every file root's in the archive).
#
#   packaging/debian/build-deb.sh [OUTPUT_DIR]      (OUTPUT_DIR: the current one by default)
#
# VERSION is osync.py's VERSION constant.  The package installs osync.py as a module in
# /usr/share/osync, byte-compiled by the postinst (the prerm removes the .pyc files, and a
# runtime.d hook compiles it again when the default python3 changes), the launcher
# packaging/osync-launcher.py as /usr/bin/osync.py, osync-batch.py and ssh_filter.py to
# /usr/bin, sync.conf as /etc/osync/sync.conf.example (a conffile, as
# is packaging/exclude.list.example when present), the systemd units of packaging/systemd
# to /lib/systemd/system (packaging/systemd/user to /usr/lib/systemd/user) with their
# ExecStart paths moved from /usr/local/bin to /usr/bin, and packaging/sysv/osync-srv as
# /etc/init.d/osync-srv (not enabled).  Maintainer: $DEBFULLNAME <$DEBEMAIL>.
set -euo pipefail

source_dir=$(cd "$(dirname "$0")/../.." && pwd)
output_dir=$(cd "${1:-.}" && pwd)
version=$(sed -n 's/^VERSION = "\([^"]*\)"$/\1/p' "$source_dir/osync.py")
if [ -z "$version" ]; then
    echo "build-deb.sh: no VERSION = \"...\" line in $source_dir/osync.py." >&2
    exit 1
fi
command -v dpkg-deb >/dev/null || { echo "build-deb.sh: dpkg-deb is needed (apt-get install dpkg)." >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/osync-deb.XXXXXX")
trap 'rm -rf "$root"' EXIT
umask 022
chmod 755 "$root"

# Scripts: the shebang names the interpreter that Depends brings (Debian policy 10.4).
install -d "$root/usr/bin"
for script in osync-batch.py ssh_filter.py; do
    sed '1s|^#!/usr/bin/env python3$|#!/usr/bin/python3|' "$source_dir/$script" > "$root/usr/bin/$script"
    chmod 755 "$root/usr/bin/$script"
done
# osync.py: the launcher, which imports the module from /usr/share/osync (its MODULE_DIR,
# relative to /usr/bin), so that no run compiles the module's source again.
sed -e '1s|^#!/usr/bin/env python3$|#!/usr/bin/python3|' \
    -e 's|^MODULE_DIR = "../lib/osync"$|MODULE_DIR = "../share/osync"|' \
    "$source_dir/packaging/osync-launcher.py" > "$root/usr/bin/osync.py"
chmod 755 "$root/usr/bin/osync.py"
grep -q '^MODULE_DIR = "../share/osync"$' "$root/usr/bin/osync.py" || {
    echo "build-deb.sh: packaging/osync-launcher.py has no MODULE_DIR = \"../lib/osync\" line." >&2; exit 1; }
install -d "$root/usr/share/osync"
install -m 644 "$source_dir/osync.py" "$root/usr/share/osync/osync.py"

install -d "$root/etc/osync"
install -m 644 "$source_dir/sync.conf" "$root/etc/osync/sync.conf.example"
conffiles="/etc/osync/sync.conf.example"
if [ -f "$source_dir/packaging/exclude.list.example" ]; then
    install -m 644 "$source_dir/packaging/exclude.list.example" "$root/etc/osync/exclude.list.example"
    conffiles="$conffiles /etc/osync/exclude.list.example"
fi

# Units, with the programs where this package puts them.
install_units() {
    local from=$1 to=$2 unit
    for unit in "$from"/*.service "$from"/*.timer; do
        [ -f "$unit" ] || continue
        install -d "$root$to"
        sed 's|/usr/local/bin/|/usr/bin/|g' "$unit" > "$root$to/$(basename "$unit")"
        chmod 644 "$root$to/$(basename "$unit")"
    done
}
install_units "$source_dir/packaging/systemd" /lib/systemd/system
install_units "$source_dir/packaging/systemd/user" /usr/lib/systemd/user

# The SysV script, for hosts booted without systemd: installed, not enabled (update-rc.d
# osync-srv defaults does that).  Debian keeps init scripts as conffiles.
if [ -f "$source_dir/packaging/sysv/osync-srv" ]; then
    install -d "$root/etc/init.d"
    sed 's|/usr/local/bin/|/usr/bin/|g' "$source_dir/packaging/sysv/osync-srv" > "$root/etc/init.d/osync-srv"
    chmod 755 "$root/etc/init.d/osync-srv"
    conffiles="$conffiles /etc/init.d/osync-srv"
fi

install -d "$root/usr/share/doc/osync"
[ -f "$source_dir/README.md" ] && install -m 644 "$source_dir/README.md" "$root/usr/share/doc/osync/README.md"

# The .pyc is made on the host, by its python3 (Debian ships no byte code in packages):
# the postinst compiles, the prerm removes every .pyc, and python3's runtime.d hook
# compiles again for a new default python3.  $DPKG_ROOT is the root dpkg installs to.
compile_module='python3 -c "import importlib.util, py_compile, sys
source, final_path = sys.argv[1:3]
compiled = importlib.util.cache_from_source(source, optimization=\"\")
py_compile.compile(source, cfile=compiled, dfile=final_path, doraise=True)" \
        "$DPKG_ROOT/usr/share/osync/osync.py" /usr/share/osync/osync.py ||
        echo "osync: could not byte-compile /usr/share/osync/osync.py; osync.py works, compiling it at each start." >&2'
install -d "$root/DEBIAN"
cat > "$root/DEBIAN/postinst" <<POSTINST
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    $compile_module
fi
POSTINST
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
rm -rf "$DPKG_ROOT/usr/share/osync/__pycache__"
PRERM
install -d "$root/usr/share/python3/runtime.d"
cat > "$root/usr/share/python3/runtime.d/osync.rtupdate" <<RTUPDATE
#!/bin/sh
set -e
if [ "\$1" = rtupdate ]; then
    rm -rf "\$DPKG_ROOT/usr/share/osync/__pycache__"
    $compile_module
fi
RTUPDATE
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/usr/share/python3/runtime.d/osync.rtupdate"
for file in $conffiles; do
    echo "$file"
done > "$root/DEBIAN/conffiles"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort | xargs md5sum) \
    > "$root/DEBIAN/md5sums"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: osync
Version: $version
Architecture: all
Maintainer: ${DEBFULLNAME:-osync.py packagers} <${DEBEMAIL:-root@localhost}>
Installed-Size: $installed_size
Depends: python3 (>= 3.6), rsync, openssh-client
Recommends: inotify-tools
Suggests: sshpass, acl, attr
Section: utils
Priority: optional
Description: two-way file synchronization with conflict backups
 osync.py keeps two directory trees in step, one local and the other local
 or on an ssh host (which needs only Python 3 and rsync). It remembers the
 state of the last run, so it knows which side changed, resolves conflicts
 by keeping the newer version and backs up the other, and soft-deletes
 rather than deletes. A drop-in replacement for osync v1.3 (osync.sh): same
 options, configuration files and work directories.
CONTROL

package="$output_dir/osync_${version}_all.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$package" >/dev/null
echo "$package"
