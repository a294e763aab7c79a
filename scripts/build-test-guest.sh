#!/usr/bin/env bash
# Builds Strata's test guest from Debian packages only: a kernel and a busybox initramfs with
# qemu-ga and the strata-workload writer. Cached: a second run with the same inputs is a no-op.
#
# Usage: scripts/build-test-guest.sh        prints the guest directory as its last line
# Cache: ${STRATA_CACHE:-$REPO/.cache}/guest/<key>/, key = GUEST_VERSION + hash of the inputs
# (this script, scripts/guest/*, the kernel package version). The directory holds:
#   kernel          uncompressed vmlinux (PVH entry, boots faster under TCG) or the bzImage
#   initrd.cpio     uncompressed newc initramfs (nothing to decompress under TCG)
#   strata-workload the static workload binary, also usable on the host against a file
#   guest.json      {"version", "kernelPackage", "kernel", "kernelFormat", "initrd", "workload"}
# Needs: apt-get (download only), dpkg-deb, xz, cpio, gcc + libc6-dev (static), ldd.
set -euo pipefail

# Bump when the guest's behaviour changes in a way the input hash would not catch.
GUEST_VERSION=1

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE_ROOT=${STRATA_CACHE:-$REPO/.cache}/guest
say() { echo "build-test-guest: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# The kernel package linux-image-amd64 points at (e.g. linux-image-6.1.0-56-amd64), and its version.
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
if [ -z "$KPKG" ]; then
  # No package lists (offline, no apt-get update): reuse the newest complete build if there is one.
  newest=$(ls -td "$CACHE_ROOT"/"$GUEST_VERSION"-*/guest.json 2>/dev/null | head -n1 || true)
  [ -n "$newest" ] || die "cannot resolve the kernel package of linux-image-amd64 (apt-get update?)"
  say "warning: apt cannot resolve linux-image-amd64; using the cached $(dirname "$newest")"
  dirname "$newest"
  exit 0
fi
KVER_PKG=$(apt-cache policy "$KPKG" | sed -n 's/^ *Candidate: //p')

INPUT_HASH=$(
  {
    echo "$GUEST_VERSION $KPKG $KVER_PKG"
    cat "$0" "$REPO"/scripts/guest/*
  } | sha256sum | cut -c1-16
)
OUT=$CACHE_ROOT/$GUEST_VERSION-$INPUT_HASH
if [ -f "$OUT/guest.json" ]; then
  echo "$OUT"
  exit 0
fi

for tool in apt-get dpkg-deb xz cpio gcc ldd; do
  command -v "$tool" >/dev/null || die "$tool is missing (see scripts/deps/apt.txt)"
done

mkdir -p "$CACHE_ROOT/debs"
# Parallel test processes may all call this script: one builds, the others wait and reuse.
exec 9>"$CACHE_ROOT/.lock"
flock 9
if [ -f "$OUT/guest.json" ]; then
  echo "$OUT"
  exit 0
fi
WORK=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
B=$WORK/out

# 1. Packages (kept in the cache: ~70 MB that rarely change).
(
  cd "$CACHE_ROOT/debs"
  for pkg in "$KPKG" busybox-static qemu-guest-agent; do
    if ! ls "${pkg}"_*.deb >/dev/null 2>&1; then
      say "downloading $pkg"
      apt-get download -q "$pkg" >/dev/null 2>&1 || apt-get download "$pkg" >&2 || die "apt-get download $pkg failed"
    fi
  done
)
X=$WORK/x
mkdir -p "$X"
for pkg in "$KPKG" busybox-static qemu-guest-agent; do
  deb=$(ls -t "$CACHE_ROOT/debs/${pkg}"_*.deb | head -n1)
  dpkg-deb -x "$deb" "$X"
done

# 2. Kernel: prefer the ELF vmlinux inside the bzImage, which QEMU boots via its PVH entry. The
#    payload is xz: try the first places its magic (FD 37 7A 58 5A) appears until one decompresses
#    to an ELF file; else boot the bzImage itself.
VMLINUZ=$(ls "$X"/boot/vmlinuz-* | head -n1)
KREL=${VMLINUZ##*/vmlinuz-}
mkdir -p "$B"
KFORMAT=bzImage
for off in $(LC_ALL=C grep -abo $'\xfd7zXZ' "$VMLINUZ" | head -n5 | cut -d: -f1); do
  tail -c +$((off + 1)) "$VMLINUZ" | xz -dc 2>/dev/null >"$WORK/vmlinux" || true
  if [ "$(head -c4 "$WORK/vmlinux" 2>/dev/null | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
    KFORMAT=vmlinux
    cp "$WORK/vmlinux" "$B/kernel"
    break
  fi
done
[ "$KFORMAT" = vmlinux ] || cp "$VMLINUZ" "$B/kernel"

# 3. The workload, static.
gcc -static -O2 -Wall -Wextra -o "$B/strata-workload" "$REPO/scripts/guest/workload.c" ||
  die "compiling the workload failed (gcc and libc6-dev are needed)"

# 4. The initramfs tree.
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc/acpi/PWRF,proc,sys,dev,run,tmp,mnt/data,var/run}
cp "$X/bin/busybox" "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
  [ "$applet" = busybox ] && continue
  ln -s busybox "$R/bin/$applet"
done
cp "$REPO/scripts/guest/init" "$R/init"
chmod 755 "$R/init"
cp "$B/strata-workload" "$R/bin/strata-workload"

# qemu-ga and the shared libraries it links (the ldd closure, resolved on this host).
cp "$X/usr/sbin/qemu-ga" "$R/usr/sbin/qemu-ga"
if ldd "$X/usr/sbin/qemu-ga" | grep -q 'not found'; then
  die "qemu-ga needs libraries this host lacks: $(ldd "$X/usr/sbin/qemu-ga" | grep 'not found' | tr '\n' ' ')"
fi
for lib in $(ldd "$X/usr/sbin/qemu-ga" | grep -o '/[^ ]*'); do
  mkdir -p "$R$(dirname "$lib")"
  cp -L "$lib" "$R$lib"
done
# ld.so lives under /lib64; with Debian's merged /usr the libs resolve under /lib too.
[ -e "$R/lib64/ld-linux-x86-64.so.2" ] || die "ld-linux-x86-64.so.2 is missing from the qemu-ga closure"

# Modules, in load order (no depmod, no modprobe: insmod one by one).
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console
crc16 crc32c_generic mbcache jbd2 ext4 fat vfat nls_cp437 nls_iso8859-1 nls_utf8 button evdev"
: >"$R/etc/modules"
for m in $MODULES; do
  f=$(find "$X/lib/modules/$KREL/kernel" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)
  [ -n "$f" ] || die "module $m not found in $KPKG"
  case "$f" in
    *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
    *) cp "$f" "$R/lib/modules/$m.ko" ;;
  esac
  echo "$m" >>"$R/etc/modules"
done

# Clean shutdown hooks: qemu-ga's guest-shutdown execs /sbin/shutdown; busybox acpid runs
# /etc/acpi/PWRF/00000080 on the ACPI power button. Both ask PID 1 to shut down.
printf '#!/bin/sh\nkill -USR1 1\n' >"$R/sbin/shutdown"
printf '#!/bin/sh\nkill -USR1 1\n' >"$R/etc/acpi/PWRF/00000080"
chmod 755 "$R/sbin/shutdown" "$R/etc/acpi/PWRF/00000080"
echo "root:x:0:0:root:/:/bin/sh" >"$R/etc/passwd"

(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) >"$B/initrd.cpio"

cat >"$B/guest.json" <<EOF
{
  "version": "$GUEST_VERSION-$INPUT_HASH",
  "kernelPackage": "$KPKG $KVER_PKG",
  "kernelRelease": "$KREL",
  "kernel": "$OUT/kernel",
  "kernelFormat": "$KFORMAT",
  "initrd": "$OUT/initrd.cpio",
  "workload": "$OUT/strata-workload"
}
EOF
rm -rf "$OUT"
mv "$B" "$OUT"
# Keep the three newest builds (other branches sharing STRATA_CACHE may still use older ones).
ls -td "$CACHE_ROOT"/[0-9]*-*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
say "built $OUT ($KFORMAT kernel, initrd $(du -h "$OUT/initrd.cpio" | cut -f1))"
echo "$OUT"
