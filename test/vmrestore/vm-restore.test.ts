// VM restores of a live backup of a running two-disk test guest (TCG here): a clone restored
// with --start runs beside the still-running original with its own name, UUID, MAC, disks and
// sockets, boots, and its workload writes; the restored disks hold a gap-free prefix of the
// original's records; one disk alone; the definition as JSON and as a QEMU command line (the
// same one --start ran); refusals over existing files and over a running VM's disks.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { parseLatencySummaries, verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm, qmpOnce, until } from "../helpers/vm.js";

const run = promisify(execFile);

interface RestoreSummary {
  scenario: string;
  consistency: string;
  vm: { name: string; uuid: string; nics: Array<{ id: string; mac: string }> };
  disks: Array<{ disk: string; path: string }>;
  definition?: string;
  started?: { pid: number; qmpSocket: string; console?: string; log: string };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The words of a shell command line, as bash splits them. */
async function shellWords(line: string): Promise<string[]> {
  const { stdout } = await run("bash", ["-c", `printf '%s\\0' ${line}`]);
  return stdout.split("\0").slice(0, -1);
}

async function argvOf(pid: number): Promise<string[]> {
  return (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0").filter((x) => x !== "");
}

const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g;
const MAC = /52:54:00(:[0-9a-f]{2}){3}/g;

describe("VM restore from a live backup", { timeout: 300_000 }, () => {
  test("a clone runs beside the original; one disk; config only; refusals", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const env = { STRATA_STATE_DIR: join(dir, "state") };
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "qcow2", size: "48M" },
        { id: "vblk1", format: "raw", size: "32M" },
      ],
      workload: ["/dev/vda", "/dev/vdb"],
      wlsize: "8M",
      extraArgs: [
        "-netdev",
        "user,id=n0,restrict=on",
        "-device",
        "virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:12:34:56",
      ],
    });
    const seq1 = await g.waitSeq(30);
    const b = summary<{ id: string; consistency: string }>(
      await strataOk(
        ["backup", "--repo", repo, "--vm", "live", "--json", `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`],
        {
          env,
        },
      ),
    );
    const id = b.id;

    // In place, while the original runs: refused, --force or not, naming the reason.
    for (const extra of [[], ["--force"], ["--disk", "vblk1"]]) {
      const r = await strata(["restore", "--repo", repo, id, ...extra]);
      assert.equal(r.code, 1, `${extra.join(" ")}: ${r.stdout} ${r.stderr}`);
      assert.match(r.stderr, /is running \(its QMP socket .*qmp\.sock answers\).*--force never overwrites/);
    }

    // The clone, started, beside the original.
    const cloneDir = join(dir, "clone");
    const c = summary<RestoreSummary>(
      await strataOk([
        "restore",
        "--repo",
        repo,
        id,
        "--target",
        cloneDir,
        "--name",
        "clone",
        "--start",
        "--json",
      ]),
    );
    const pid = c.started!.pid;
    t.after(async () => {
      if (alive(pid)) process.kill(pid, "SIGKILL");
      await until("the clone's exit", 10_000, async () => (alive(pid) ? undefined : true));
    });
    assert.equal(c.scenario, "clone");
    assert.equal(c.consistency, b.consistency);
    assert.equal(c.definition, join(cloneDir, "clone.json"));
    assert.deepEqual(
      c.disks.map((d) => d.path),
      [join(cloneDir, "vblk0.qcow2"), join(cloneDir, "vblk1.raw")],
    );
    assert.equal(c.started!.qmpSocket, join(cloneDir, "run", "qmp.sock"));
    assert.equal(c.started!.console, join(cloneDir, "run", "console.log"));
    const cloneConsole = () => readFile(c.started!.console!, "utf8").catch(() => "");
    await until("STRATA-GUEST-READY on the clone's console", 120_000, async () =>
      /STRATA-GUEST-READY/.test(await cloneConsole()) ? true : undefined,
    );
    // Its workload writes to its restored disks.
    await until("the clone's workload", 60_000, async () =>
      (parseLatencySummaries(await cloneConsole()).at(-1)?.seq ?? 0) >= 40 ? true : undefined,
    );
    // ...and the original keeps running and writing.
    await g.waitSeq((await g.seq()) + 20);

    // No clash: name, UUID, MAC, disks, sockets.
    const q = <T>(sock: string, cmd: string, args?: Record<string, unknown>) => qmpOnce<T>(sock, cmd, args);
    const sockO = g.vm.qmpSocket;
    const sockC = c.started!.qmpSocket;
    assert.equal((await q<{ name: string }>(sockO, "query-name")).name, "live");
    assert.equal((await q<{ name: string }>(sockC, "query-name")).name, "clone");
    const uuidO = (await q<{ UUID: string }>(sockO, "query-uuid")).UUID;
    const uuidC = (await q<{ UUID: string }>(sockC, "query-uuid")).UUID;
    assert.notEqual(uuidC, uuidO);
    assert.equal(uuidC, c.vm.uuid);
    const mac = (sock: string) =>
      q<string>(sock, "qom-get", { path: "/machine/peripheral/net0", property: "mac" });
    assert.equal(await mac(sockO), "52:54:00:12:34:56");
    const macC = await mac(sockC);
    assert.match(macC, /^52:54:00(:[0-9a-f]{2}){3}$/);
    assert.notEqual(macC, "52:54:00:12:34:56");
    assert.deepEqual(c.vm.nics, [{ id: "net0", type: "virtio-net-pci", mac: macC }]);
    const argvC = await argvOf(pid);
    const argvO = await argvOf(g.vm.pid);
    assert.ok(
      !argvC.some((a) => a.includes(g.dir)),
      `the clone names none of the original's files: ${argvC.join(" ")}`,
    );
    assert.ok(argvC.some((a) => a.includes(`filename=${join(cloneDir, "vblk0.qcow2")}`)));
    assert.ok(argvO.some((a) => a.includes(`filename=${g.files.vblk0!}`)));

    // The definition as a QEMU command line is the one --start ran (for another clone directory).
    const c2 = join(dir, "c2");
    const args = await strataOk([
      "restore",
      "--repo",
      repo,
      id,
      "--config-only",
      "--as",
      "qemu-args",
      "--target",
      c2,
      "--name",
      "clone",
    ]);
    const words = await shellWords(args.stdout.trim());
    const norm = (xs: string[], d: string) =>
      xs.map((a) => a.replaceAll(d, "DIR").replace(UUID, "U").replace(MAC, "M"));
    assert.deepEqual(norm(words, c2), norm(argvC, cloneDir));
    // As JSON, in place: the original's definition.
    const def = JSON.parse((await strataOk(["restore", "--repo", repo, id, "--config-only"])).stdout) as {
      format: string;
      name: string;
      uuid: string;
      clone: boolean;
      qmpSocket: string;
      disks: Array<{ file: string }>;
      nics: Array<{ mac: string }>;
      commandLine: string[];
    };
    assert.equal(def.format, "strata-vm");
    assert.equal(def.name, "live");
    assert.equal(def.clone, false);
    assert.equal(def.uuid, uuidO);
    assert.equal(def.qmpSocket, sockO);
    assert.deepEqual(
      def.disks.map((d) => d.file),
      [g.files.vblk0, g.files.vblk1],
    );
    assert.deepEqual(def.nics[0]!.mac, "52:54:00:12:34:56");
    assert.deepEqual(def.commandLine, argvO);
    // Written to a file, refused the second time without --force.
    const defFile = join(dir, "live.json");
    await strataOk(["restore", "--repo", repo, id, "--config-only", "--to", defFile]);
    const again = await strata(["restore", "--repo", repo, id, "--config-only", "--to", defFile]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, new RegExp(`${defFile} exists \\(use --force`));
    await strataOk(["restore", "--repo", repo, id, "--config-only", "--to", defFile, "--force"]);

    // The restored disks hold a gap-free prefix of the original's records, both cut at one instant
    // (a second restore of the same point: the clone's own workload has overwritten its copy).
    const check = join(dir, "check");
    await strataOk(["restore", "--repo", repo, id, "--target", check, "--name", "check"]);
    const a = await verifyRecords(join(check, "vblk0.qcow2"), { format: "qcow2" });
    const bb = await verifyRecords(join(check, "vblk1.raw"));
    for (const r of [a, bb]) {
      assert.ok(
        r.gapFree,
        `missing ${r.missing.slice(0, 5)}, bad ${JSON.stringify(r.badRecords.slice(0, 2))}`,
      );
      assert.ok(r.lastSeq >= seq1, `last seq ${r.lastSeq} < ${seq1}`);
    }
    assert.ok(
      a.lastSeq - bb.lastSeq === 0 || a.lastSeq - bb.lastSeq === 1,
      `vda ${a.lastSeq}, vdb ${bb.lastSeq}`,
    );
    // Existing files are not replaced without --force; the error names the file.
    const clobber = await strata(["restore", "--repo", repo, id, "--target", check, "--name", "check"]);
    assert.equal(clobber.code, 1);
    assert.match(
      clobber.stderr,
      new RegExp(`restore target ${join(check, "vblk0.qcow2")} exists \\(use --force`),
    );
    // Over a running clone's disks: refused even with --force.
    const running = await strata([
      "restore",
      "--repo",
      repo,
      id,
      "--target",
      cloneDir,
      "--name",
      "clone",
      "--force",
    ]);
    assert.equal(running.code, 1);
    assert.match(running.stderr, /is running|in use/);

    // One disk, into a directory, in its recorded format unless told otherwise.
    const one = join(dir, "one");
    const d = summary<RestoreSummary>(
      await strataOk([
        "restore",
        "--repo",
        repo,
        id,
        "--disk",
        "vblk0",
        "--target",
        one,
        "--format",
        "raw",
        "--json",
      ]),
    );
    assert.equal(d.scenario, "disk");
    assert.deepEqual(
      d.disks.map((x) => x.path),
      [join(one, "vblk0.raw")],
    );
    const r0 = await verifyRecords(join(one, "vblk0.raw"));
    assert.ok(r0.gapFree && r0.lastSeq === a.lastSeq, `one disk: ${r0.lastSeq} vs ${a.lastSeq}`);

    // The clone's own writes on its disks are gap-free too, once it is stopped.
    await q(sockC, "quit").catch(() => {});
    await until("the clone's exit", 20_000, async () => (alive(pid) ? undefined : true));
    const cr = await verifyRecords(join(cloneDir, "vblk0.qcow2"), { format: "qcow2" });
    assert.ok(
      cr.gapFree && cr.lastSeq >= 40,
      `clone's run: last ${cr.lastSeq}, missing ${cr.missing.slice(0, 5)}`,
    );

    // In place once the original is down: refused over its files without --force, done with it.
    await g.vm.stop({ timeoutMs: 10_000 });
    const noForce = await strata(["restore", "--repo", repo, id]);
    assert.equal(noForce.code, 1);
    assert.match(noForce.stderr, new RegExp(`restore target ${g.files.vblk0!} exists \\(use --force`));
    const inPlace = summary<RestoreSummary>(
      await strataOk(["restore", "--repo", repo, id, "--force", "--start", "--json"]),
    );
    const pidO = inPlace.started!.pid;
    t.after(async () => {
      if (alive(pidO)) process.kill(pidO, "SIGKILL");
      await until("the restored original's exit", 10_000, async () => (alive(pidO) ? undefined : true));
    });
    assert.equal(inPlace.scenario, "in-place");
    assert.deepEqual(
      inPlace.disks.map((x) => x.path),
      [g.files.vblk0, g.files.vblk1],
    );
    // Started in place: its own identity, sockets and console, as recorded.
    assert.equal(inPlace.started!.qmpSocket, sockO);
    assert.equal(inPlace.vm.uuid, uuidO);
    assert.deepEqual(await argvOf(pidO), argvO);
    await until("STRATA-GUEST-READY on the original's console", 120_000, async () =>
      /STRATA-GUEST-READY/.test(await readFile(inPlace.started!.console!, "utf8").catch(() => ""))
        ? true
        : undefined,
    );
    assert.equal(await mac(sockO), "52:54:00:12:34:56");
    await q(sockO, "quit").catch(() => {});
    await until("the restored original's exit", 20_000, async () => (alive(pidO) ? undefined : true));
    // The restored original's own writes on its restored disk are gap-free.
    const back = await verifyRecords(g.files.vblk1!);
    assert.ok(back.gapFree, `in place: missing ${back.missing.slice(0, 5)}`);
    // The guest agent froze nothing (no mounted disk): crash-consistent, and snapshots says what that means.
    assert.equal(b.consistency, "crash-consistent");
    const snaps = await strataOk(["snapshots", "--repo", repo]);
    assert.match(snaps.stdout, /crash-consistent: it boots as after a power loss/);
  });
});
