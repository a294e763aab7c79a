// Btrfs, NTFS and LVM logical volumes through libguestfs, on two disks built here by one
// guestfish script (no host mounts, no loop devices):
//   data   GPT: 1 Btrfs (default subvolume "vol"), 2 NTFS, 3 an LVM PV
//   data2  no partition table: a whole-disk PV
//   vg0 on data:3 + data2: root (ext4, 80 MiB, its extents on both disks), empty (zeros)
// Building the disks boots one appliance; each files command that mounts a filesystem boots
// another (~20 s under TCG), so the suite runs two tests at a time and the kill test, which has
// an image of its own (mkfs.btrfs on a file), runs while the disks are being built.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, promises as fs, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { chooseAccelerator } from "../../src/hypervisor/qemu/launcher.js";
import { type RunResult, startStrata, strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { sh } from "./images.js";

const payload = randomBytes(700 * 1024);
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
const MiB = 1024 * 1024;
const isRoot = process.getuid?.() === 0;

/** libguestfs's environment for the test's own guestfish (Strata sets its own). */
async function guestfsEnv(): Promise<Record<string, string>> {
  const env: Record<string, string> = { LIBGUESTFS_BACKEND: process.env.LIBGUESTFS_BACKEND ?? "direct" };
  if ((await chooseAccelerator()).accel === "tcg") env.LIBGUESTFS_BACKEND_SETTINGS = "force_tcg";
  return env;
}

/**
 * Strata's environment for a run whose leftovers are checked: its temporary files go to `tmp`
 * (libguestfs's appliance cache stays where it is).
 */
function scoped(tmp: string): { env: Record<string, string> } {
  return {
    env: {
      TMPDIR: tmp,
      LIBGUESTFS_CACHEDIR: process.env.LIBGUESTFS_CACHEDIR ?? process.env.TMPDIR ?? "/var/tmp",
    },
  };
}

interface Proc {
  pid: number;
  ppid: number;
  session: number;
  cmdline: string;
}

async function processes(): Promise<Proc[]> {
  const out: Proc[] = [];
  for (const name of await fs.readdir("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = await fs.readFile(`/proc/${name}/stat`, "utf8");
      const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      const cmdline = (await fs.readFile(`/proc/${name}/cmdline`, "utf8")).replace(/\0/g, " ");
      // Zombies are gone but for their exit status, which whoever adopted them may never collect.
      if (f[0] !== "Z") out.push({ pid: Number(name), ppid: Number(f[1]), session: Number(f[3]), cmdline });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** No process mentions `tmp` and no private directory of Strata's is left in it. */
async function assertNothingLeft(tmp: string): Promise<void> {
  const procs = (await processes()).filter((p) => p.cmdline.includes(tmp));
  assert.deepEqual(
    procs.map((p) => p.cmdline),
    [],
    "no appliance, guestfish or guard outlives the run",
  );
  assert.deepEqual(await fs.readdir(tmp), [], "no temporary files are left");
}

function json<T>(r: RunResult): T {
  return JSON.parse(r.stdout) as T;
}

async function failsWith(r: Promise<RunResult>, code: string, pattern: RegExp): Promise<void> {
  const res = await r;
  assert.notEqual(res.code, 0, res.stdout);
  const e = JSON.parse(res.stderr.trim().split("\n").at(-1)!) as { code: string; message: string };
  assert.equal(e.code, code, e.message);
  assert.match(e.message, pattern);
}

const root = mkdtempSync(join(tmpdir(), "strata-fsvol-"));
after(() => rmSync(root, { recursive: true, force: true }));
const repo = join(root, "repo");

/** Builds the two disks with one guestfish script and backs them up as VM x. */
async function build(): Promise<void> {
  await fs.writeFile(join(root, "payload"), payload);
  for (const [name, text] of [
    ["top", "top level\n"],
    ["hb", "hello from btrfs\n"],
    ["hn", "hello from ntfs\n"],
    ["hl", "hello from lvm\n"],
  ])
    await fs.writeFile(join(root, name!), text!);
  const f = (name: string) => join(root, name);
  // Sectors: data is 200 MiB; p1 128 MiB, p2 32 MiB, p3 the rest (9 extents of 4 MiB). data2 is
  // 64 MiB (15 extents), so an 80 MiB LV needs both.
  const script = `
part-init /dev/sda gpt
part-add /dev/sda p 2048 264191
part-add /dev/sda p 264192 329727
part-add /dev/sda p 329728 -2048
mkfs btrfs /dev/sda1
mkfs ntfs /dev/sda2
pvcreate /dev/sda3
pvcreate /dev/sdb
vgcreate vg0 "/dev/sda3 /dev/sdb"
lvcreate root vg0 80
lvcreate empty vg0 8
mkfs ext4 /dev/vg0/root
mount /dev/vg0/root /
upload ${f("hl")} /hello.txt
chmod 0640 /hello.txt
chown 1000 1001 /hello.txt
mkdir-mode /sub 0750
upload ${f("payload")} /sub/data.bin
chmod 0600 /sub/data.bin
ln-s sub/data.bin /link
umount /
mount /dev/sda1 /
upload ${f("top")} /top.txt
btrfs-subvolume-create /vol
upload ${f("hb")} /vol/hello.txt
chmod 0640 /vol/hello.txt
chown 1000 1001 /vol/hello.txt
mkdir-mode /vol/sub 0750
upload ${f("payload")} /vol/sub/data.bin
chmod 0600 /vol/sub/data.bin
ln-s sub/data.bin /vol/link
btrfs-subvolume-set-default 256 /
umount /
mount /dev/sda2 /
mkdir "/Program Files"
upload ${f("payload")} "/Program Files/data.bin"
upload ${f("hn")} "/Ünïcødé.txt"
ln-s "Program Files/data.bin" /link
umount /
`;
  await fs.writeFile(f("build.fish"), script);
  await sh(
    "guestfish",
    ["-N", `${f("data.img")}=disk:200M`, "-N", `${f("data2.img")}=disk:64M`, "-f", f("build.fish")],
    await guestfsEnv(),
  );
  await strataOk(["init", "--repo", repo, "--chunk-size", "1M"]);
  await strataOk([
    "backup",
    "--repo",
    repo,
    "--vm",
    "x",
    `file:${f("data.img")},name=data`,
    `file:${f("data2.img")},name=data2`,
  ]);
}

let built: Promise<void> | undefined;
const ready = () => {
  built ??= build();
  return built;
};

/** Files get the guest's owners only when asked (and when root). */
const sameOwner = isRoot ? ["--same-owner"] : [];

/** The tree the LVM and Btrfs volumes hold: contents, a symlink, modes, and owners when root. */
async function assertUnixTree(out: string, greeting: string): Promise<void> {
  assert.equal(await fs.readFile(join(out, "hello.txt"), "utf8"), greeting);
  assert.equal(sha(await fs.readFile(join(out, "sub/data.bin"))), sha(payload));
  assert.equal(await fs.readlink(join(out, "link")), "sub/data.bin");
  const hello = await fs.stat(join(out, "hello.txt"));
  assert.equal(hello.mode & 0o7777, 0o640);
  assert.equal((await fs.stat(join(out, "sub"))).mode & 0o7777, 0o750);
  assert.equal((await fs.stat(join(out, "sub/data.bin"))).mode & 0o7777, 0o600);
  if (isRoot) assert.deepEqual([hello.uid, hello.gid], [1000, 1001]);
}

describe("Btrfs, NTFS and LVM through libguestfs", { concurrency: 2 }, () => {
  test("a killed files get leaves no appliance, guestfish, NBD socket or temporary file behind", async (t) => {
    const dir = tempDir(t, "strata-fskill-");
    const tmp = join(dir, "tmp");
    await fs.mkdir(tmp);
    const image = join(dir, "btrfs.img");
    await fs.writeFile(image, "");
    await fs.truncate(image, 128 * MiB);
    await sh("mkfs.btrfs", ["-q", image]);
    const krepo = join(dir, "repo");
    await strataOk(["init", "--repo", krepo, "--chunk-size", "1M"]);
    await strataOk(["backup", "--repo", krepo, "--vm", "k", `file:${image},name=disk`]);
    const child = startStrata(
      ["files", "get", "--repo", krepo, "k/latest", "/", "--to", join(dir, "out")],
      scoped(tmp),
    );
    const exited = new Promise((r) => child.once("exit", r));
    // Strata's guard, and the appliance's QEMU in the guard's session: the boot is under way.
    const guard = await waitFor(
      "the guard",
      async () =>
        (await processes()).find((p) => p.ppid === child.pid && p.cmdline.includes("strata-guestfish-guard")),
      60_000,
    );
    const daemon = await waitFor(
      "the appliance",
      async () => {
        const mine = (await processes()).filter((p) => p.session === guard.pid);
        return mine.some((p) => p.cmdline.startsWith("/usr/bin/qemu") || p.cmdline.includes("qemu-system"))
          ? mine.find((p) => p.cmdline.startsWith("guestfish --listen"))
          : undefined;
      },
      60_000,
    );
    child.kill("SIGKILL");
    await exited;
    await waitFor(
      "the guard to clean up",
      async () => ((await processes()).some((p) => p.session === guard.pid) ? undefined : true),
      90_000,
    );
    assert.ok(
      !existsSync(`/tmp/.guestfish-${process.getuid?.()}/socket-${daemon.pid}`),
      "guestfish's socket",
    );
    await assertNothingLeft(tmp);
  });

  test("files ls lists partitions, PVs and the volume group's logical volumes without an appliance", async () => {
    await ready();
    const started = Date.now();
    const doc = json<{
      disks: Array<{
        disk: string;
        scheme: string;
        partitions: Array<{ number: number; filesystem: string; volumeGroup?: string }>;
      }>;
      volumeGroups: Array<{
        name: string;
        pvs: Array<{ location: string | null; device: string }>;
        lvs: Array<{ name: string; size: number; layout: string; filesystem: string | null; blank: boolean }>;
      }>;
    }>(await strataOk(["files", "ls", "--repo", repo, "x/latest", "--json"]));
    assert.deepEqual(
      doc.disks.map((d) => [
        d.disk,
        d.scheme,
        d.partitions.map((p) => [p.number, p.filesystem, p.volumeGroup]),
      ]),
      [
        [
          "data",
          "gpt",
          [
            [1, "btrfs", undefined],
            [2, "ntfs", undefined],
            [3, "LVM2_member", "vg0"],
          ],
        ],
        ["data2", "none", [[0, "LVM2_member", "vg0"]]],
      ],
    );
    assert.equal(doc.volumeGroups.length, 1);
    const vg = doc.volumeGroups[0]!;
    assert.equal(vg.name, "vg0");
    // Where each PV is in the restore point; the guest's device name is only a hint (the
    // appliance that built the disks named them in probe order).
    assert.deepEqual(
      vg.pvs.map((p) => p.location),
      ["data:3", "data2"],
    );
    assert.ok(vg.pvs.every((p) => p.device.startsWith("/dev/")));
    assert.deepEqual(
      vg.lvs.map((l) => [l.name, l.size, l.layout, l.filesystem, l.blank]),
      [
        ["vg0/root", 80 * MiB, "linear", "ext4", false],
        ["vg0/empty", 8 * MiB, "linear", null, true],
      ],
    );
    // A disk alone: its partitions and the volume groups with a PV on it, as text.
    const text = (await strataOk(["files", "ls", "--repo", repo, "x/latest", "data2"])).stdout;
    assert.match(text, /^disk data2 \(64\.0 MiB\), no partition table$/m);
    assert.match(text, /^LVM volume group vg0 \(96\.0 MiB\), PVs on data:3, data2$/m);
    assert.match(text, /^ {2}vg0\/root {2}size 80\.0 MiB {2}linear {2}ext4$/m);
    assert.match(text, /^ {2}vg0\/empty {2}size 8\.0 MiB {2}linear {2}blank \(zeros\)$/m);
    assert.doesNotMatch(text, /^disk data \(/m);
    // Partition tables and LVM metadata are read in-process: far quicker than an appliance boot.
    assert.ok(Date.now() - started < 15_000, `took ${Date.now() - started} ms`);
  });

  test("no such VG or LV, a PV or a blank LV named: clear errors, without an appliance", async () => {
    await ready();
    const ls = (...args: string[]) => strata(["files", "ls", "--repo", repo, "x/latest", ...args, "--json"]);
    await failsWith(
      ls("vg0/nope", "/"),
      "NOT_FOUND",
      /volume group vg0 of x\/\S+ has no logical volume nope; it has: root, empty$/,
    );
    await failsWith(ls("data:vg9/root", "/"), "NOT_FOUND", /no LVM volume group vg9 in x\/\S+; it has: vg0$/);
    await failsWith(
      ls("data:1:2"),
      "USAGE",
      /is not DISK, DISK:PARTITION, :PARTITION, VG\/LV or DISK:VG\/LV/,
    );
    await failsWith(
      ls("data:3", "/"),
      "USAGE",
      /partition 3 is an LVM physical volume of volume group vg0: name a logical volume: data:vg0\/root \(linear, 80\.0 MiB, ext4\)/,
    );
    await failsWith(
      ls("data", "/"),
      "USAGE",
      /3 partitions, say which: .*; or a logical volume: data:vg0\/root \(linear, 80\.0 MiB, ext4\), data:vg0\/empty/,
    );
    await failsWith(ls("vg0/empty", "/"), "USAGE", /logical volume vg0\/empty holds no filesystem/);
    await failsWith(ls("data:2", "--subvolume", "vol", "/"), "USAGE", /--subvolume is for Btrfs/);
  });

  test("files get reads an ext4 logical volume spanning two disks", async (t) => {
    await ready();
    const tmp = tempDir(t, "strata-fsvol-tmp-");
    const out = join(tempDir(t, "strata-fsvol-out-"), "lv");
    const s = summary<Record<string, unknown>>(
      await strataOk(
        [
          "files",
          "get",
          "--repo",
          repo,
          "x/latest",
          "/",
          "--disk",
          "vg0/root",
          "--to",
          out,
          "--json",
          ...sameOwner,
        ],
        scoped(tmp),
      ),
    );
    assert.equal(s.volume, "vg0/root");
    assert.deepEqual([s.files, s.directories, s.symlinks], [2, 3, 1]); // /, sub, lost+found
    await assertUnixTree(out, "hello from lvm\n");
    await assertNothingLeft(tmp);
  });

  test("files get reads Btrfs's default subvolume", async (t) => {
    await ready();
    const tmp = tempDir(t, "strata-fsvol-tmp-");
    const out = join(tempDir(t, "strata-fsvol-out-"), "btrfs");
    const s = summary<Record<string, unknown>>(
      await strataOk(
        [
          "files",
          "get",
          "--repo",
          repo,
          "x/latest",
          "/",
          "--disk",
          "data:1",
          "--to",
          out,
          "--json",
          ...sameOwner,
        ],
        scoped(tmp),
      ),
    );
    assert.deepEqual([s.partition, s.files, s.directories, s.symlinks], [1, 2, 2, 1]);
    // The default subvolume is "vol", so the top level's top.txt is not there.
    assert.deepEqual((await fs.readdir(out)).sort(), ["hello.txt", "link", "sub"]);
    await assertUnixTree(out, "hello from btrfs\n");
    await assertNothingLeft(tmp);
  });

  test("files ls --subvolume / shows Btrfs's top level and lists its subvolumes", async (t) => {
    await ready();
    const tmp = tempDir(t, "strata-fsvol-tmp-");
    const doc = json<{
      filesystem: string;
      subvolume: string;
      subvolumes: Array<{ id: number; path: string; default: boolean }>;
      entries: Array<{ name: string; kind: string; size: number }>;
    }>(
      await strataOk(
        ["files", "ls", "--repo", repo, "x/latest", "data:1", "--subvolume", "/", "/", "--json"],
        scoped(tmp),
      ),
    );
    assert.equal(doc.filesystem, "btrfs");
    assert.deepEqual(
      doc.entries.map((e) => [e.name, e.kind, e.size]),
      [
        ["top.txt", "file", 10],
        ["vol", "directory", 0],
      ],
    );
    assert.deepEqual(doc.subvolumes, [{ id: 256, path: "vol", default: true }]);
    await assertNothingLeft(tmp);
  });

  test("files get reads NTFS: names with spaces and accents, contents, symlinks", async (t) => {
    await ready();
    const tmp = tempDir(t, "strata-fsvol-tmp-");
    const out = join(tempDir(t, "strata-fsvol-out-"), "ntfs");
    const s = summary<Record<string, unknown>>(
      await strataOk(
        ["files", "get", "--repo", repo, "x/latest", "/", "--disk", "data:2", "--to", out, "--json"],
        scoped(tmp),
      ),
    );
    assert.deepEqual([s.partition, s.files, s.directories, s.symlinks], [2, 2, 2, 1]);
    assert.deepEqual((await fs.readdir(out)).sort(), ["Program Files", "link", "Ünïcødé.txt"]);
    assert.equal(await fs.readFile(join(out, "Ünïcødé.txt"), "utf8"), "hello from ntfs\n");
    assert.equal(sha(await fs.readFile(join(out, "Program Files/data.bin"))), sha(payload));
    assert.equal(await fs.readlink(join(out, "link")), "Program Files/data.bin");
    // NTFS has no Unix modes: ntfs-3g shows everything as 0777, and that is what comes back.
    assert.ok((await fs.stat(join(out, "Program Files"))).isDirectory());
    await assertNothingLeft(tmp);
  });
});
