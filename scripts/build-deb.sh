#!/usr/bin/env bash
# Builds strata_VERSION_ARCH.deb: Strata with its own Node runtime, for Debian/Proxmox hosts that
# have no Node 20 (Proxmox VE 8 ships Node 18). Installs
#   /opt/strata/node           the Node binary this script runs with (NODE=... for another)
#   /opt/strata/{bin,dist,package.json,node_modules}   Strata, its production packages only
#   /usr/bin/strata            runs /opt/strata/bin/strata with /opt/strata/node
#   /lib/systemd/system/strata.service   packaging/strata.service (not enabled)
#   /etc/strata, /var/lib/strata         configuration and state folders (owner-only)
# Native packages (better-sqlite3, zstd-napi, ...) are the ones built for that Node here, so
# build on the Debian release you install on (or an older one).
#
# Usage: scripts/build-deb.sh [OUT_DIR]   (default: dist-deb/); prints the .deb's path.
# Needs: a built dist/ (npm run build), node_modules, dpkg-deb, npm.
# Install: apt install ./strata_VERSION_ARCH.deb (pulls qemu-img: qemu-utils, or Proxmox's own).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(realpath -m "${1:-dist-deb}")
NODE=${NODE:-$(command -v node)}
say() { echo "build-deb: $*" >&2; }

[ -f dist/src/cli/main.js ] || {
  say "dist/ is not built: run npm run build first"
  exit 1
}
[ -d node_modules ] || {
  say "node_modules is missing: run scripts/setup.sh first"
  exit 1
}
VERSION=$("$NODE" -p 'require("./package.json").version')
case "$(uname -m)" in
x86_64) ARCH=amd64 ;;
aarch64) ARCH=arm64 ;;
*) ARCH=$(uname -m) ;;
esac
NODE_VERSION=$("$NODE" --version)
case "$NODE_VERSION" in
v2[0-9].* | v[3-9][0-9].*) ;;
*)
  say "$NODE is Node $NODE_VERSION; Strata needs 20 or later"
  exit 1
  ;;
esac

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/strata-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
PKG=$STAGE/pkg
OPT=$PKG/opt/strata
mkdir -p "$OPT/bin" "$PKG/usr/bin" "$PKG/lib/systemd/system" "$PKG/etc/strata" "$PKG/var/lib/strata" "$PKG/DEBIAN"

say "Node $NODE_VERSION from $NODE"
install -m 0755 "$NODE" "$OPT/node"
install -m 0755 bin/strata "$OPT/bin/strata"
# The compiled program without its tests and source maps.
(cd dist && find src -type f -name '*.js' ! -name '*.test.js' ! -name '*.fixtures.js' -print0 |
  cpio --quiet -0 -pdm "$OPT/dist")
cp package.json package-lock.json "$OPT/"
# The native addon (scripts/build-native.mjs: AES-GCM, huge pages), built against the node installed beside it.
if [ -f native/build/Release/strata_native.node ]; then
  install -D -m 0755 native/build/Release/strata_native.node "$OPT/native/build/Release/strata_native.node"
fi
# Production packages only: a copy of node_modules with the development ones pruned (offline;
# the native builds are kept as they are).
say "copying production node_modules"
cp -a "$(realpath node_modules)" "$OPT/node_modules"
[ ! -L "$OPT/node_modules" ] || exit 1
(cd "$OPT" && npm prune --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
rm -f "$OPT/package-lock.json"

cat >"$PKG/usr/bin/strata" <<'EOF'
#!/bin/sh
# Strata with its own Node runtime (/opt/strata/node); no system Node is needed.
exec /opt/strata/node /opt/strata/bin/strata "$@"
EOF
chmod 0755 "$PKG/usr/bin/strata"
install -m 0644 packaging/strata.service "$PKG/lib/systemd/system/strata.service"
chmod 0700 "$PKG/var/lib/strata"
chmod 0755 "$PKG/etc/strata"

SIZE=$(du -sk "$PKG" | cut -f1)
cat >"$PKG/DEBIAN/control" <<EOF
Package: strata
Version: $VERSION
Architecture: $ARCH
Maintainer: Strata <strata@localhost>
Installed-Size: $SIZE
Depends: libc6, libstdc++6, libgcc-s1, qemu-utils | pve-qemu-kvm
Recommends: util-linux
Section: admin
Priority: optional
Description: host-level backup and recovery for KVM/QEMU virtual machines
 Strata backs up VM disks incrementally into a deduplicated, optionally encrypted
 repository, restores them, and runs as a daemon with policies (strata.service).
 This package carries its own Node.js runtime ($NODE_VERSION) under /opt/strata.
EOF
cat >"$PKG/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
# The unit is installed, not enabled: it needs /etc/strata/strata.yaml first.
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
EOF
cat >"$PKG/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
EOF
chmod 0755 "$PKG/DEBIAN/postinst" "$PKG/DEBIAN/postrm"

mkdir -p "$OUT"
DEB=$OUT/strata_${VERSION}_${ARCH}.deb
say "packing $DEB"
dpkg-deb --root-owner-group -Zgzip -z3 --build "$PKG" "$DEB" >/dev/null
echo "$DEB"
