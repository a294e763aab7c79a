// Instant recovery of live backups of the test guest (TCG here, one VM at a time): the VM boots
// from the restore point in seconds, whatever its disk sizes (two VMs that differ only in their
// ext4 data disk, 64 MiB or 4 GiB sparse, which the guest mounts at boot; median of three boots
// each), and its workload writes to the overlays; the serving process is killed while the guest
// runs, its writes wait (copy-on-write needs the backing) and go on after resume; a migration
// throttled to 1 MiB/s is killed and run again; the disks migrate live to production storage
// while the workload writes, and what lands there is a gap-free prefix holding every record the
// guest reported, those written after the backup included, and the random data of a third disk,
// byte for byte.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { describe, type TestContext, test } from "node:test";
import { promisify } from "node:util";
import { startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { parseLatencySummaries, verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm, qmpOnce, until } from "../helpers/vm.js";

const run = promisify(execFile);

interface Described {
  name: string;
  phase: string;
  /** The VM, with the QEMU adapter's details (QMP socket, console). */
  vm: { pid: number | null; running: boolean; qmpSocket: string; console: string | null };
  serve: { pid: number | null; running: boolean; socket: string };
  disks: Array<{ name: string; size: number; overlay: string; production?: string }>;
}

/** True while `pid` runs (an exited process not yet reaped, a zombie, does not count). */
function alive(pid: number | null | undefined): boolean {
  if (!pid) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.charAt(stat.lastIndexOf(")") + 2) !== "Z";
  } catch {
    return false;
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** The workload's latest reported seq on a console log (0 before its first report). */
async function consoleSeq(path: string): Promise<number> {
  return parseLatencySummaries(await readFile(path, "utf8").catch(() => "")).at(-1)?.seq ?? 0;
}

describe("instant recovery", { timeout: 420_000 }, () => {
  test("boots from a backup in seconds, survives a server restart, migrates live", async (t: TestContext) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const stateDir = join(dir, "state");
    const env = { STRATA_STATE_DIR: stateDir };
    const st = (args: string[]) => strataOk(["--repo", repo, ...args], { env });
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const started: number[] = [];
    t.after(async () => {
      // Whatever a failed assertion left running: every QEMU and server the test started.
      const list = JSON.parse((await strataOk(["instant", "list", "--json"], { env })).stdout) as Described[];
      for (const s of list) {
        for (const pid of [s.vm.pid, s.serve.pid]) if (alive(pid)) process.kill(pid!, "SIGKILL");
      }
      for (const pid of started) if (alive(pid)) process.kill(pid, "SIGKILL");
    });

    /** Live backup of a freshly booted guest, then the guest is stopped. */
    const backUp = async (
      disks: Parameters<typeof bootWorkloadVm>[1]["disks"],
      data?: string,
      extraArgs?: string[],
    ) => {
      const g = await bootWorkloadVm(t, {
        disks,
        workload: ["/dev/vda"],
        wlsize: "8M",
        ...(data ? { data } : {}),
        ...(extraArgs ? { extraArgs } : {}),
      });
      await g.waitSeq(30);
      const b = summary<{ id: string }>(
        await st(["backup", "--vm", "live", "--json", `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`]),
      );
      const seqAfterBackup = await g.seq();
      await g.vm.stop({ timeoutMs: 10_000 });
      return { id: b.id, seqAfterBackup };
    };

    /** strata instant, timed until the guest's workload reported its first records. */
    const boot = async (id: string, name: string) => {
      const t0 = Date.now();
      const s = summary<Described & { startMs: number }>(
        await st(["instant", id, "--name", name, "--target", join(dir, name), "--json"]),
      );
      const commandMs = Date.now() - t0;
      started.push(s.vm.pid!, s.serve.pid!);
      assert.ok(alive(s.vm.pid) && alive(s.serve.pid), "QEMU and the server run detached");
      const con = s.vm.console!;
      await until(`STRATA-GUEST-READY on ${name}'s console`, 120_000, async () =>
        /STRATA-GUEST-READY/.test(await readFile(con, "utf8").catch(() => "")) ? true : undefined,
      );
      await until(`${name}'s workload`, 60_000, async () => ((await consoleSeq(con)) > 0 ? true : undefined));
      return { s, commandMs, workloadMs: Date.now() - t0 };
    };

    // Both VMs: the workload's disk, an ext4 data disk the guest mounts at boot (64 MiB, then
    // 4 GiB sparse: the only difference), and a disk holding 64 MiB of random data, so that the
    // migration's throughput (reads from the repository over NBD) is measured on data that does
    // not compress. The second backup of that disk stores nothing new (dedup).
    const filled = join(dir, "filled.raw");
    await run("qemu-img", ["create", "-q", "-f", "raw", filled, "256M"]);
    await run("dd", [
      "if=/dev/urandom",
      `of=${filled}`,
      "bs=1M",
      "count=64",
      "seek=96",
      "conv=notrunc",
      "status=none",
    ]);
    const filledDisk = [
      "-blockdev",
      `driver=file,filename=${filled},node-name=disk2-file`,
      "-blockdev",
      "driver=raw,file=disk2-file,node-name=disk2",
      "-device",
      "virtio-blk-pci,drive=disk2,id=vblk2",
    ];
    const vmWithData = (size: string) =>
      backUp(
        [
          { id: "vblk0", format: "qcow2", size: "64M" },
          { id: "vblk1", format: "raw", size, ext4: true },
        ],
        "/dev/vdb",
        filledDisk,
      );
    const small = await vmWithData("64M");
    const big = await vmWithData("4G");

    // Time to a running workload, three runs each; the last big one stays up for what follows.
    const times: Record<string, number[]> = { small: [], big: [] };
    const commandTimes: Record<string, number[]> = { small: [], big: [] };
    let keep: Described | undefined;
    for (const [label, b] of [
      ["small", small],
      ["big", big],
    ] as const) {
      for (let k = 0; k < 3; k++) {
        const name = `ir-${label}-${k}`;
        const r = await boot(b.id, name);
        times[label]!.push(r.workloadMs);
        commandTimes[label]!.push(r.commandMs);
        const overlays = await Promise.all(r.s.disks.map((d) => stat(d.overlay)));
        assert.ok(
          overlays.every((o) => o.size < 16 * 1024 * 1024),
          "overlays hold only what the guest wrote",
        );
        if (label === "big" && k === 2) {
          keep = r.s;
          break;
        }
        if (label === "small" && k === 2) {
          // An active mirror to raw files: every guest write goes to both copies until the pivot.
          const rawDir = join(dir, "prod-raw");
          const seqBefore = await consoleSeq(r.s.vm.console!);
          await st(["instant", "migrate", name, "--target", rawDir, "--format", "raw", "--active"]);
          await until(`${name}'s workload after the pivot`, 60_000, async () =>
            (await consoleSeq(r.s.vm.console!)) > seqBefore + 60 ? true : undefined,
          );
          const last = await consoleSeq(r.s.vm.console!);
          await st(["instant", "stop", name]);
          const rec = await verifyRecords(join(rawDir, "vblk0.raw"));
          assert.ok(
            rec.gapFree && rec.lastSeq >= last,
            `raw: last ${rec.lastSeq} of ${last}, missing ${rec.missing}`,
          );
          await run("cmp", [filled, join(rawDir, "vblk2.raw")]);
          await st(["instant", "stop", name, "--discard"]);
          continue;
        }
        const stop = summary<{ vm: string; discarded: string[] }>(
          await st(["instant", "stop", name, "--discard", "--json"]),
        );
        assert.equal(stop.vm, "quit");
        assert.equal(stop.discarded.length, r.s.disks.length);
        // Reaped by init a moment after they exit.
        await until("QEMU and the server to be gone after stop", 5000, async () =>
          alive(r.s.vm.pid) || alive(r.s.serve.pid) ? undefined : true,
        );
      }
    }
    const mSmall = median(times.small!);
    const mBig = median(times.big!);
    t.diagnostic(
      `time to a running workload (median of 3), data disk of 64 MiB: ${mSmall} ms (${times.small!.join(", ")}), ` +
        `of 4 GiB sparse: ${mBig} ms (${times.big!.join(", ")}); ` +
        `the command itself: ${median(commandTimes.small!)} ms, ${median(commandTimes.big!)} ms`,
    );
    assert.ok(mBig < mSmall * 1.5 + 3000, `4 GiB: ${mBig} ms vs 64 MiB: ${mSmall} ms`);

    // The big VM mounted its 4 GiB data disk from the backup.
    const s = keep!;
    const con = s.vm.console!;
    assert.match(await readFile(con, "utf8"), /mounted \/dev\/vdb on \/mnt\/data/);
    const list = JSON.parse((await st(["instant", "list", "--json"])).stdout) as Described[];
    assert.deepEqual(
      list.map((x) => [x.name, x.phase, x.vm.running, x.serve.running]),
      [["ir-big-2", "running", true, true]],
    );

    // The server dies while the guest runs; resume starts it on the same socket.
    await until("the workload past the backup's records", 60_000, async () =>
      (await consoleSeq(con)) > big.seqAfterBackup + 20 ? true : undefined,
    );
    // Still in its first pass over the ring, the workload's next write to a new overlay cluster
    // needs the backing (copy-on-write): it waits for the server instead of failing.
    const reportsBefore = parseLatencySummaries(await readFile(con, "utf8")).length;
    process.kill(s.serve.pid!, "SIGKILL");
    const killedAt = Date.now();
    await until("the server's exit", 10_000, async () => (alive(s.serve.pid) ? undefined : true));
    await new Promise((r) => setTimeout(r, 2000));
    const resumed = summary<Described & { restarted: string[] }>(
      await st(["instant", "resume", "ir-big-2", "--json"]),
    );
    const resumedAt = Date.now();
    assert.deepEqual(resumed.restarted, ["serve"]);
    assert.ok(alive(resumed.serve.pid) && resumed.serve.pid !== s.serve.pid);
    started.push(resumed.serve.pid!);
    assert.equal(resumed.vm.pid, s.vm.pid, "the guest kept running");
    const again = await st(["instant", "resume", "ir-big-2", "--json"]);
    assert.deepEqual(summary<{ restarted: string[] }>(again).restarted, []);
    const seqResumed = await consoleSeq(con);
    await until("the workload after resume", 60_000, async () =>
      (await consoleSeq(con)) > seqResumed + 20 ? true : undefined,
    );
    const stall = Math.max(
      ...parseLatencySummaries(await readFile(con, "utf8"))
        .slice(reportsBefore)
        .map((x) => x.maxUs / 1000),
    );
    t.diagnostic(
      `server killed and resumed ${resumedAt - killedAt} ms later: the longest guest write meanwhile took ${stall.toFixed(0)} ms, none failed`,
    );
    assert.ok(stall >= 1500, `the guest's writes waited for the server (longest ${stall} ms)`);

    // A migration throttled to 1 MiB/s is killed mid-way: its mirror job stays in QEMU, resume
    // says so, and running it again (unthrottled) cancels the job and starts over.
    const prod = join(dir, "prod");
    const slow = startStrata(
      ["--repo", repo, "instant", "migrate", "ir-big-2", "--target", prod, "--limit", "1", "--json"],
      { env },
    );
    let slowOut = "";
    slow.stdout!.on("data", (d: Buffer) => {
      slowOut += d.toString();
    });
    await until("the throttled mirror's progress", 30_000, async () =>
      /"type":"progress"/.test(slowOut) ? true : undefined,
    );
    slow.kill("SIGKILL");
    await new Promise((r) => slow.once("close", r));
    const jobs = await qmpOnce<Array<{ id: string; status: string }>>(s.vm.qmpSocket, "query-jobs");
    assert.deepEqual(
      jobs.map((j) => [j.id, j.status]),
      [["instant-migrate0", "running"]],
      "the killed migration's mirror still runs",
    );
    const interrupted = await st(["instant", "resume", "ir-big-2"]);
    assert.match(
      interrupted.stdout,
      /a migration to .*prod did not finish: run strata instant migrate ir-big-2/,
    );

    // Live migration while the workload writes; the NBD client must have reconnected to read
    // the whole backing.
    const seqBefore = await consoleSeq(con);
    const m = summary<{
      disks: Array<{ disk: string; path: string; size: number; readyMs: number; bytesPerSecond: number }>;
    }>(await st(["instant", "migrate", "ir-big-2", "--target", prod, "--json"]));
    const seqPivot = await consoleSeq(con);
    assert.deepEqual(
      m.disks.map((d) => d.path),
      [join(prod, "vblk0.qcow2"), join(prod, "vblk1.qcow2"), join(prod, "vblk2.qcow2")],
    );
    const v2 = m.disks[2]!;
    t.diagnostic(
      `migration of 64 MiB of random data (vblk2, 256 MiB): ready in ${v2.readyMs} ms, ` +
        `${((64 * 1000) / v2.readyMs).toFixed(0)} MiB/s of data fetched from the repository, verified and written`,
    );
    t.diagnostic(
      `migration: ${m.disks
        .map(
          (d) =>
            `${d.disk} ${(d.size / 2 ** 20).toFixed(0)} MiB ready in ${d.readyMs} ms (${(d.bytesPerSecond / 2 ** 20).toFixed(0)} MiB/s of virtual size)`,
        )
        .join(", ")}; workload seq ${seqBefore} → ${seqPivot} meanwhile`,
    );
    assert.ok(seqPivot > seqBefore, "the workload wrote during the migration");
    const after = (JSON.parse((await st(["instant", "list", "--json"])).stdout) as Described[])[0]!;
    assert.equal(after.phase, "migrated");
    assert.ok(after.vm.running, "the guest runs on");
    assert.ok(!after.serve.running, `the server is stopped: ${JSON.stringify(after.serve)}`);
    await until("the server's exit", 5000, async () => (alive(resumed.serve.pid) ? undefined : true));
    for (const d of s.disks) await assert.rejects(stat(d.overlay), "overlays are removed");
    const nodes = (
      await qmpOnce<Array<{ "node-name": string; file: string }>>(s.vm.qmpSocket, "query-named-block-nodes", {
        flat: true,
      })
    ).map((n) => n["node-name"]);
    assert.ok(!nodes.some((n) => /^instant-(nbd|bk)/.test(n)), `NBD and backing nodes freed: ${nodes}`);
    const blocks = await qmpOnce<Array<{ inserted?: { file: string } }>>(s.vm.qmpSocket, "query-block");
    assert.deepEqual(blocks.flatMap((b) => (b.inserted ? [b.inserted.file] : [])).sort(), [
      join(prod, "vblk0.qcow2"),
      join(prod, "vblk1.qcow2"),
      join(prod, "vblk2.qcow2"),
    ]);
    // The migrated VM backs up like any other: every disk, none taken for a leftover of Strata's.
    const again2 = summary<{ disks: Array<{ name: string; size: number }> }>(
      await st([
        "backup",
        "--vm",
        "ir",
        "--json",
        `qmp:${s.vm.qmpSocket},qga=${join(dir, "ir-big-2", "run", "qga.sock")}`,
      ]),
    );
    assert.deepEqual(
      again2.disks.map((d) => [d.name, d.size]),
      [
        ["vblk0", 64 * 2 ** 20],
        ["vblk1", 4 * 2 ** 30],
        ["vblk2", 256 * 2 ** 20],
      ],
    );
    // No second outage: the guest goes on writing, now to production storage.
    await until("the workload after the pivot", 60_000, async () =>
      (await consoleSeq(con)) > seqPivot + 30 ? true : undefined,
    );
    const seqLast = await consoleSeq(con);
    const stop = summary<{ vm: string }>(await st(["instant", "stop", "ir-big-2", "--json"]));
    assert.equal(stop.vm, "quit");
    const r = await verifyRecords(join(prod, "vblk0.qcow2"), { format: "qcow2" });
    assert.ok(r.gapFree, `missing ${r.missing.slice(0, 5)}, bad ${JSON.stringify(r.badRecords.slice(0, 2))}`);
    assert.ok(r.lastSeq >= seqLast, `last record ${r.lastSeq}, the guest reported ${seqLast}`);
    assert.ok(r.lastSeq > big.seqAfterBackup, `beyond the backup's ${big.seqAfterBackup}`);
    const info = JSON.parse(
      (await run("qemu-img", ["info", "--output=json", join(prod, "vblk1.qcow2")])).stdout,
    ) as { "virtual-size": number; "actual-size": number; "backing-filename"?: string };
    assert.equal(info["virtual-size"], 4 * 2 ** 30);
    assert.equal(info["backing-filename"], undefined, "production disks stand alone");
    assert.ok(info["actual-size"] < 512 * 2 ** 20, `sparse: ${info["actual-size"]} bytes allocated`);
    // The random data arrived intact (the guest never wrote to that disk).
    const copy = join(dir, "vblk2.raw");
    await run("qemu-img", ["convert", "-O", "raw", join(prod, "vblk2.qcow2"), copy]);
    await run("cmp", [filled, copy]);
    await strataOk(["instant", "stop", "ir-big-2", "--discard"], { env });
    assert.deepEqual(JSON.parse((await st(["instant", "list", "--json"])).stdout), []);
  });
});
