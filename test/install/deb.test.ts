// The install path for hosts without Node 20: scripts/build-deb.sh builds the .deb from this
// checkout, and on a fresh minimal Debian 12 (a debootstrap'd chroot, cached under
// $STRATA_CACHE/debian-minbase) without any Node, `apt-get install ./strata.deb` installs it with
// its dependencies (qemu-utils, from the Debian mirror); `strata --help` runs on
// the package's own runtime, and a backup and restore of an image file there is bit-exact. The
// systemd unit, /etc/strata and /var/lib/strata are in place. Needs root (debootstrap, chroot).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { test } from "node:test";
import { ROOT } from "../helpers/cli.js";

const CACHE = resolve(process.env.STRATA_CACHE ?? join(ROOT, ".cache"), "debian-minbase");

function run(
  cmd: string,
  args: readonly string[],
  timeoutMs = 600_000,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((done) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) =>
      done({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

async function ok(cmd: string, args: readonly string[], timeoutMs?: number): Promise<string> {
  const r = await run(cmd, args, timeoutMs);
  assert.equal(r.code, 0, `${cmd} ${args.join(" ")} failed:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** The mount points under `dir`, deepest first. */
function mountsUnder(dir: string): string[] {
  return readFileSync("/proc/mounts", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[1] ?? "")
    .filter((m) => m === dir || m.startsWith(`${dir}/`))
    .sort()
    .reverse();
}

test("the .deb installs on a fresh Debian 12 without Node and backs up and restores there", async (t) => {
  assert.equal(process.getuid?.(), 0, "this test needs root (debootstrap, chroot)");
  const t0 = performance.now();
  const tarball = join(CACHE, "rootfs-bookworm.tar");
  await ok(join(ROOT, "scripts", "debian-minbase.sh"), [tarball, CACHE], 1_800_000);
  const tBase = performance.now();

  const dir = mkdtempSync(join(tmpdir(), "strata-deb-"));
  const root = join(dir, "root");
  t.after(async () => {
    for (const m of mountsUnder(root))
      if ((await run("umount", [m])).code !== 0) await run("umount", ["-l", m]);
    // Never delete through a mount that is still there.
    if (mountsUnder(root).length === 0) rmSync(dir, { recursive: true, force: true });
  });
  const deb = (await ok(join(ROOT, "scripts", "build-deb.sh"), [join(dir, "out")])).trim();
  assert.match(deb, /strata_\d+\.\d+\.\d+_\w+\.deb$/);
  const tDeb = performance.now();

  mkdirSync(root);
  await ok("tar", ["-C", root, "--numeric-owner", "-xf", tarball]);
  await ok("mount", ["-t", "proc", "proc", join(root, "proc")]);
  const inRoot = (script: string) =>
    run("chroot", [
      root,
      "/usr/bin/env",
      "-i",
      "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
      "HOME=/root",
      "sh",
      "-c",
      script,
    ]);

  // A fresh system: no Node anywhere on its PATH, no strata.
  const before = await inRoot("command -v node nodejs strata; ls /usr/lib/node_modules 2>/dev/null; true");
  assert.equal(before.stdout.trim(), "", `the fresh system has no Node: ${before.stdout}`);

  writeFileSync(join(root, "tmp", "strata.deb"), readFileSync(deb));
  // apt's downloads and lists are kept in the cache, so a rerun fetches nothing new.
  for (const [cached, inside] of [
    ["apt-archives", "var/cache/apt/archives"],
    ["apt-lists", "var/lib/apt/lists"],
  ] as const) {
    mkdirSync(join(CACHE, cached, "partial"), { recursive: true });
    await ok("mount", ["--bind", join(CACHE, cached), join(root, inside)]);
  }
  // The documented install command: apt resolves the dependencies (qemu-img) from the mirror.
  const installed = await inRoot(
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /tmp/strata.deb",
  );
  assert.equal(installed.code, 0, installed.stderr + installed.stdout);
  const noNode = await inRoot("command -v node nodejs || echo none");
  assert.equal(noNode.stdout.trim(), "none", "installing Strata puts no node on the PATH");
  assert.equal(readFileSync(join(root, "usr", "bin", "strata"), "utf8").includes("/opt/strata/node"), true);

  const help = await inRoot("strata --help");
  assert.equal(help.code, 0, help.stderr);
  assert.match(help.stdout, /Usage: strata/);
  assert.match(help.stdout, /backup/);
  const version = await inRoot("/opt/strata/node --version");
  assert.equal(version.stdout.trim(), process.version, "the package carries the runtime it was built with");

  // A backup and a restore of a small image file, bit-exact.
  const image = randomBytes(3 << 20);
  writeFileSync(join(root, "root", "disk.img"), Buffer.concat([image, Buffer.alloc(1 << 20)]));
  const flow = await inRoot(
    [
      "set -e",
      "strata init --repo /root/repo --chunk-size 64K",
      "strata backup --repo /root/repo --vm d file:/root/disk.img,name=disk",
      "strata restore --repo /root/repo d/latest --target /root/out",
      "strata snapshots --repo /root/repo",
    ].join("\n"),
  );
  assert.equal(flow.code, 0, flow.stderr + flow.stdout);
  assert.ok(
    readFileSync(join(root, "root", "out", "disk.raw")).equals(readFileSync(join(root, "root", "disk.img"))),
    "the restored image equals the original, bit for bit",
  );

  // The service's pieces: the unit runs the packaged binary; configuration and state folders.
  const unit = readFileSync(join(root, "lib", "systemd", "system", "strata.service"), "utf8");
  assert.match(unit, /^ExecStart=\/usr\/bin\/strata daemon --config \/etc\/strata\/strata\.yaml$/m);
  assert.ok(existsSync(join(root, "etc", "strata")));
  assert.equal(statSync(join(root, "var", "lib", "strata")).mode & 0o777, 0o700);
  const listed = await inRoot("dpkg -s strata");
  assert.match(listed.stdout, /Status: install ok installed/);
  t.diagnostic(
    `debian base ${((tBase - t0) / 1000).toFixed(1)} s, build .deb ${((tDeb - tBase) / 1000).toFixed(1)} s ` +
      `(${(statSync(deb).size / 2 ** 20).toFixed(1)} MiB), install and run ${((performance.now() - tDeb) / 1000).toFixed(1)} s`,
  );
});
