#!/usr/bin/env bash
# Builds the headline benchmark disk: a 4 GiB ext4 image holding a debootstrap'd Debian 12 root
# file system (kernel, systemd, Python, Perl, a compiler, libraries, docs), then "next day" images
# made by really using that system in a chroot: packages installed and removed with apt-get from
# the same mirror, logs rotated and appended, a SQLite database grown and updated, configuration
# edited, user files created and deleted. Day N's image is a copy of day N-1's, loop-mounted and
# changed. Called by bench/debian-disk.ts, which caches the result and decides when to rebuild.
#
# Usage: scripts/bench-debian-disk.sh OUT_DIR DAYS BASE_CACHE
#   OUT_DIR     receives day0.img .. dayDAYS.img (built under OUT_DIR; the caller renames it into place)
#   BASE_CACHE  keeps what is slow to fetch across recipe changes: debs/ (debootstrap --cache-dir),
#               apt-archives/ (the days' apt-get downloads) and rootfs-<key>.tar (the debootstrap'd
#               tree, keyed by suite, mirror and package set)
# Needs root (mount, chroot), debootstrap, mkfs.ext4, tar.
set -euo pipefail

OUT=$(realpath -m "$1")
DAYS=$2
BASE_CACHE=$(realpath -m "$3")
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
IMAGE_SIZE=4G
# Installed after debootstrap with apt-get (debootstrap's own resolver does not follow virtual
# packages): what an installed server or developer VM carries, recommended packages included.
PACKAGES="linux-image-amd64 systemd-sysv dbus python3 python3-venv python3-pip python3-doc perl perl-doc
build-essential gdb git vim less man-db manpages manpages-dev openssh-server curl wget ca-certificates
locales sudo rsync bash-completion postgresql default-jre-headless libssl-dev zlib1g-dev libxml2-dev
unattended-upgrades logrotate cron rsyslog"
say() { echo "bench-debian-disk: $*" >&2; }

[ "$(id -u)" = 0 ] || {
  say "needs root (debootstrap, mount, chroot)"
  exit 1
}
mkdir -p "$OUT" "$BASE_CACHE/debs" "$BASE_CACHE/apt-archives/partial"

MNT=""
cleanup() {
  # Unmount everything below the build directories, deepest first, whatever failed.
  local targets=()
  [ -n "$MNT" ] && targets+=("$MNT")
  targets+=("$BASE_CACHE/rootfs.tmp")
  for t in "${targets[@]}"; do
    awk -v p="$t" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts | sort -r |
      while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  done
  [ -n "$MNT" ] && rmdir "$MNT" 2>/dev/null || true
  rm -f "$BASE_CACHE/rootfs.tmp/usr/sbin/policy-rc.d"
}
trap cleanup EXIT INT TERM

# Mounts what apt-get and package scripts need into the chroot at $1 (cleanup unmounts them).
enter() {
  local root=${1:?}
  mount -t proc proc "$root/proc"
  mount -t sysfs sys "$root/sys"
  mount --bind /dev "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
  # Package downloads stay on the host, so a rebuild downloads nothing again.
  mount --bind "$BASE_CACHE/apt-archives" "$root/var/cache/apt/archives"
  # No service starts in the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod +x "$root/usr/sbin/policy-rc.d"
}

# --- the installed system, once: debootstrap, apt-get install, kept as a tarball ----------------
BASE_KEY=$(echo "3 $SUITE $MIRROR $PACKAGES" | sha256sum | cut -c1-12)
TARBALL=$BASE_CACHE/rootfs-$BASE_KEY.tar
if [ ! -f "$TARBALL" ]; then
  ROOTFS=$BASE_CACHE/rootfs.tmp
  cleanup
  rm -rf --one-file-system "$ROOTFS"
  say "debootstrap $SUITE (downloads cached in $BASE_CACHE/debs)"
  debootstrap --arch=amd64 --cache-dir="$BASE_CACHE/debs" "$SUITE" "$ROOTFS" "$MIRROR" >&2
  cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
  echo bench-vm >"$ROOTFS/etc/hostname"
  echo "/dev/vda1 / ext4 errors=remount-ro 0 1" >"$ROOTFS/etc/fstab"
  enter "$ROOTFS"
  say "apt-get install $(echo $PACKAGES | wc -w) packages with their dependencies and recommends"
  # The lists apt-get uses on the next days too: fetched once, with the system.
  chroot "$ROOTFS" apt-get -qq update >&2
  # shellcheck disable=SC2086 # a list of package names
  DEBIAN_FRONTEND=noninteractive chroot "$ROOTFS" apt-get -y -qq -o Dpkg::Use-Pty=0 install $PACKAGES >&2
  sed -i 's/^# *en_US.UTF-8/en_US.UTF-8/' "$ROOTFS/etc/locale.gen"
  chroot "$ROOTFS" locale-gen >&2
  cleanup
  tar --numeric-owner --xattrs -cpf "$TARBALL.tmp" -C "$ROOTFS" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf --one-file-system "$ROOTFS"
fi

# --- day 0: the system in a fresh ext4 image ------------------------------------------------------
MNT=$(mktemp -d /tmp/strata-bench-mnt.XXXXXX)
say "day 0: $IMAGE_SIZE ext4 image from $TARBALL"
rm -f "$OUT/day0.img"
truncate -s "$IMAGE_SIZE" "$OUT/day0.img"
mkfs.ext4 -q -F -b 4096 -L bench-root "$OUT/day0.img"
mount -o loop "$OUT/day0.img" "$MNT"
tar --numeric-owner --xattrs -xpf "$TARBALL" -C "$MNT"
umount "$MNT"
# The loop device's last writes may not be visible yet to cp's hole detection: a copy made
# without this sync lost files.
sync -f "$OUT/day0.img"

# --- one day of use, inside the chroot ------------------------------------------------------------
# Packages installed on day d (cycled), and the ones installed two days before removed again.
DAY_INSTALL=(
  "sqlite3 tmux htop jq"
  "nginx-light python3-numpy strace"
  "php-cli redis-server iotop"
  "ruby nodejs lsof"
  "golang-go ncdu tree"
)

day_script() {
  local d=$1
  local install=${DAY_INSTALL[$(((d - 1) % ${#DAY_INSTALL[@]}))]}
  local remove=""
  if [ "$d" -ge 3 ]; then
    remove=${DAY_INSTALL[$(((d - 3) % ${#DAY_INSTALL[@]}))]}
    remove=${remove//sqlite3/} # the database keeps its tool
  fi
  cat <<EOF
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
apt_opts=(-y -qq -o Dpkg::Use-Pty=0)
apt-get "\${apt_opts[@]}" install sqlite3 $install >/dev/null
[ -z "$remove" ] || apt-get "\${apt_opts[@]}" purge $remove >/dev/null
apt-get "\${apt_opts[@]}" autoremove --purge >/dev/null

# Logs: rotate (gzip the older generations), then a day of appends.
mkdir -p /var/log/app
for f in /var/log/app/access.log /var/log/app/error.log /var/log/syslog /var/log/auth.log; do
  [ -f "\$f" ] || : >"\$f"
  for i in 6 5 4 3 2; do
    if [ -f "\$f.\$((i - 1)).gz" ]; then mv "\$f.\$((i - 1)).gz" "\$f.\$i.gz"; fi
  done
  if [ -f "\$f.1" ]; then gzip -n -f "\$f.1" && mv "\$f.1.gz" "\$f.2.gz"; fi
  if [ -s "\$f" ]; then mv "\$f" "\$f.1"; fi
  : >"\$f"
done
rm -f /var/log/app/*.7.gz /var/log/*.7.gz

id -u user >/dev/null 2>&1 || useradd -m -s /bin/bash user

python3 - $d <<'PY'
import os, random, sys, hashlib
d = int(sys.argv[1])
rng = random.Random(f"day{d}")
words = [w for w in open("/usr/share/dict/words").read().split()] if os.path.exists("/usr/share/dict/words") else \
    open("/usr/share/common-licenses/GPL-3").read().split()
def line(n): return " ".join(rng.choice(words) for _ in range(n))
with open("/var/log/app/access.log", "a") as f:
    for i in range(180_000):
        f.write(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)} - - [day{d}:{i // 7200:02d}:{i // 120 % 60:02d}:{i % 60:02d}] "
                f"\"GET /{rng.choice(words)}/{rng.randrange(10**6)} HTTP/1.1\" {rng.choice((200, 200, 200, 304, 404, 500))} {rng.randrange(10**5)} \"-\" \"Mozilla/5.0\"\n")
with open("/var/log/app/error.log", "a") as f:
    for i in range(8_000):
        f.write(f"day{d} {i} ERROR worker {rng.randrange(64)}: {line(12)}\n")
with open("/var/log/syslog", "a") as f:
    for i in range(60_000):
        f.write(f"Nov {d:2d} {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d} bench-vm {rng.choice(('cron', 'systemd', 'kernel', 'sshd', 'nginx'))}[{rng.randrange(99999)}]: {line(9)}\n")
with open("/var/log/auth.log", "a") as f:
    for i in range(6_000):
        f.write(f"Nov {d:2d} bench-vm sshd[{rng.randrange(99999)}]: Accepted publickey for user from 10.0.{rng.randrange(256)}.{rng.randrange(256)}\n")

# User files: documents (text), photos (incompressible), one source tree edited; older ones deleted.
home = "/home/user"
os.makedirs(f"{home}/docs", exist_ok=True); os.makedirs(f"{home}/photos", exist_ok=True)
for i in range(40):
    with open(f"{home}/docs/day{d}-note{i}.txt", "w") as f:
        f.write("\n".join(line(14) for _ in range(rng.randrange(200, 2000))))
for i in range(6):
    with open(f"{home}/photos/day{d}-img{i}.jpg", "wb") as f:
        f.write(rng.randbytes(rng.randrange(2, 6) * 1024 * 1024))
for name in sorted(os.listdir(f"{home}/docs")):
    if name.startswith(f"day{d - 2}-") and rng.random() < 0.5: os.remove(f"{home}/docs/{name}")
for name in sorted(os.listdir(f"{home}/photos")):
    if name.startswith(f"day{d - 2}-") and rng.random() < 0.3: os.remove(f"{home}/photos/{name}")
os.makedirs(f"{home}/src/project", exist_ok=True)
for i in range(300):
    p = f"{home}/src/project/mod{i}.py"
    if i % 7 == d % 7 or not os.path.exists(p):
        with open(p, "w") as f:
            f.write(f"# module {i}, revision {d}\n" + "\n".join(f"def f{j}(x):\n    return x * {rng.randrange(1000)}  # {line(6)}" for j in range(rng.randrange(20, 120))))
PY

# A database that grows every day (inserts) and is updated in place (random pages rewritten).
mkdir -p /var/lib/app
sqlite3 /var/lib/app/app.db <<SQL
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, day INTEGER, kind TEXT, payload TEXT, score REAL);
CREATE INDEX IF NOT EXISTS events_day_kind ON events (day, kind);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250000)
INSERT INTO events (day, kind, payload, score)
  SELECT $d, printf('k%02d', (i * 2654435761 + $d) % 37),
         printf('%08x-%s-%d', (i * 2246822519 + $d * 3266489917) % 4294967296,
                substr('lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor', 1 + i % 40, 30 + i % 50), i),
         ((i * 40503 + $d) % 100000) / 1000.0
  FROM n;
UPDATE events SET score = score + 1, payload = payload || '.' WHERE (id * 2654435761 + $d) % 50 = 0;
PRAGMA wal_checkpoint(TRUNCATE);
SQL

# Configuration edits.
chown -R user:user /home/user
sed -i "s/^#\?MaxSessions .*/MaxSessions $((10 + d))/" /etc/ssh/sshd_config
echo "10.0.0.$d host$d.internal" >>/etc/hosts
printf 'vm.swappiness = %d\nnet.core.somaxconn = %d\n' $((10 + d)) $((1024 * d)) >/etc/sysctl.d/90-bench.conf
echo "$((d % 60)) 3 * * * root /usr/local/bin/report-$d" >/etc/cron.d/report
EOF
}

prev=0
for d in $(seq 1 "$DAYS"); do
  say "day $d: copy of day $prev, used in a chroot"
  cp --sparse=always "$OUT/day$prev.img" "$OUT/day$d.img"
  mount -o loop "$OUT/day$d.img" "$MNT"
  enter "$MNT"
  day_script "$d" | chroot "$MNT" /bin/bash -s >&2
  rm -f "$MNT/usr/sbin/policy-rc.d"
  cleanup
  sync -f "$OUT/day$d.img"
  MNT=$(mktemp -d /tmp/strata-bench-mnt.XXXXXX)
  prev=$d
done
