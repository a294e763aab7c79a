#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine (as root) for Strata: system packages, npm packages, build.
# Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t wanted < <(sed -e 's/#.*//' -e '/^\s*$/d' scripts/deps/apt.txt)
# npm builds two native modules (better-sqlite3, zstd-napi) with these: they are installed first,
# and npm then runs beside the installation of the rest (minutes of QEMU, libguestfs, Ceph,
# Chromium and a kernel on a fresh machine), not after it.
toolchain=" gcc libc6-dev g++ make python3 "
tools=()
rest=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && continue
  if [[ "$toolchain" == *" $pkg "* ]]; then tools+=("$pkg"); else rest+=("$pkg"); fi
done
export DEBIAN_FRONTEND=noninteractive
if [ $((${#tools[@]} + ${#rest[@]})) -gt 0 ]; then
  apt-get update -qq
fi
if [ ${#tools[@]} -gt 0 ]; then
  echo "setup: installing Debian packages (build tools): ${tools[*]}"
  apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
fi

npm_pid=""
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm packages"
  # npm ci refuses lock files without the other platforms' optional packages, which this
  # registry setup leaves out; npm install follows the lock file all the same.
  npm install --no-audit --no-fund --loglevel=error &
  npm_pid=$!
fi
apt_status=0
if [ ${#rest[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${rest[*]}"
  apt-get install -y -qq --no-install-recommends "${rest[@]}" >/dev/null || apt_status=$?
fi
npm_status=0
if [ -n "$npm_pid" ]; then wait "$npm_pid" || npm_status=$?; fi
if [ "$apt_status" -ne 0 ]; then
  echo "setup: apt-get install failed (exit $apt_status)" >&2
  exit "$apt_status"
fi
if [ "$npm_status" -ne 0 ]; then
  echo "setup: npm install failed (exit $npm_status)" >&2
  exit "$npm_status"
fi
npm run --silent build
