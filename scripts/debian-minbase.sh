#!/usr/bin/env bash
# A minimal Debian 12 root file system (debootstrap --variant=minbase: no Node, no systemd) as a
# tar, for tests that install Strata's .deb on a fresh system. Cached: an existing OUT_TAR is kept.
#
# Usage: scripts/debian-minbase.sh OUT_TAR CACHE_DIR
#   CACHE_DIR keeps debs/ (debootstrap --cache-dir), so a rebuild downloads nothing again.
# Needs root and debootstrap; the mirror is deb.debian.org, as in scripts/bench-debian-disk.sh.
set -euo pipefail
OUT=$(realpath -m "$1")
CACHE=$(realpath -m "$2")
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
[ -f "$OUT" ] && exit 0
[ "$(id -u)" = 0 ] || {
  echo "debian-minbase: needs root (debootstrap)" >&2
  exit 1
}
mkdir -p "$CACHE/debs" "$(dirname "$OUT")"
TREE=$(mktemp -d "$CACHE/rootfs.XXXXXX")
trap 'rm -rf "$TREE" "$OUT.tmp"' EXIT
echo "debian-minbase: debootstrap $SUITE (minbase) from $MIRROR" >&2
debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$TREE" "$MIRROR" >&2
tar -C "$TREE" --numeric-owner -cf "$OUT.tmp" .
mv "$OUT.tmp" "$OUT"
