// Instant recovery out of an S3 repository (a real Ceph RADOS Gateway): the test guest, backed up
// live into a local repository and into a bucket, boots from the S3 restore point (the server
// reads packs through the local read cache), its workload writes, and its disks migrate live to
// local storage: what lands there holds every record the guest reported. Prints, in the same run
// and for the same guest: live backup and restore throughput, local against S3, and the time
// from `strata instant` to the guest's workload running, local against S3.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, type TestContext, test } from "node:test";
import { promisify } from "node:util";
import { createBucket, gatewayForFile } from "../helpers/ceph.js";
import { strataOk, summary, tempDir } from "../helpers/cli.js";
import { parseLatencySummaries, verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm, until } from "../helpers/vm.js";

const run = promisify(execFile);
const gateway = gatewayForFile();
const MiB = 1024 * 1024;

interface Described {
  name: string;
  vm: { pid: number | null; console: string | null };
  serve: { pid: number | null };
}

async function consoleSeq(path: string): Promise<number> {
  return parseLatencySummaries(await readFile(path, "utf8").catch(() => "")).at(-1)?.seq ?? 0;
}

function kill(pid: number | null | undefined): void {
  try {
    if (pid) process.kill(pid, "SIGKILL");
  } catch {}
}

describe("instant recovery from S3", { timeout: 600_000 }, () => {
  test("boots the guest from an S3 restore point and migrates it to local storage", async (t: TestContext) => {
    const gw = gateway();
    const dir = tempDir(t);
    const local = join(dir, "repo");
    const s3 = `s3:${gw.endpoint}/${await createBucket(gw)}/vms`;
    // The credentials only in a file named by --s3-credentials, none in the environment: the
    // detached strata serve that instant recovery starts must be handed the same option.
    const creds = join(dir, "s3.credentials");
    await writeFile(
      creds,
      `[default]\naws_access_key_id = ${gw.accessKeyId}\naws_secret_access_key = ${gw.secretAccessKey}\n`,
      { mode: 0o600 },
    );
    const env = {
      AWS_ACCESS_KEY_ID: undefined,
      AWS_SECRET_ACCESS_KEY: undefined,
      STRATA_S3_CREDENTIALS: join(dir, "no-such-file"),
      STRATA_STATE_DIR: join(dir, "state"),
      STRATA_S3_CACHE_DIR: join(dir, "cache"),
    };
    const st = (repo: string, args: string[]) =>
      strataOk(["--repo", repo, "--s3-credentials", creds, ...args], { env });
    await st(local, ["init", "--chunk-size", "256K"]);
    await st(s3, ["init", "--chunk-size", "256K"]);
    const started: Array<number | null> = [];
    t.after(async () => {
      const list = JSON.parse((await strataOk(["instant", "list", "--json"], { env })).stdout) as Described[];
      for (const s of list) for (const pid of [s.vm.pid, s.serve.pid]) kill(pid);
      for (const pid of started) kill(pid);
    });

    // One guest, backed up live into both repositories one after the other. A third disk holds
    // 64 MiB of random data, so that throughput is measured on data that does not compress.
    const filled = join(dir, "filled.raw");
    await run("qemu-img", ["create", "-q", "-f", "raw", filled, "96M"]);
    await run("dd", [
      "if=/dev/urandom",
      `of=${filled}`,
      "bs=1M",
      "count=64",
      "seek=16",
      "conv=notrunc",
      "status=none",
    ]);
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "qcow2", size: "64M" },
        { id: "vblk1", format: "raw", size: "96M", ext4: true },
      ],
      workload: ["/dev/vda"],
      wlsize: "8M",
      data: "/dev/vdb",
      extraArgs: [
        "-blockdev",
        `driver=file,filename=${filled},node-name=disk2-file`,
        "-blockdev",
        "driver=raw,file=disk2-file,node-name=disk2",
        "-device",
        "virtio-blk-pci,drive=disk2,id=vblk2",
      ],
    });
    await g.waitSeq(30);
    const backups: Record<string, { id: string; bytesRead: number; ms: number }> = {};
    for (const [label, repo] of [
      ["local", local],
      ["s3", s3],
    ] as const) {
      const t0 = Date.now();
      const b = summary<{ id: string; bytesRead: number }>(
        await st(repo, ["backup", "--vm", "live", "--json", `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`]),
      );
      backups[label] = { id: b.id, bytesRead: b.bytesRead, ms: Date.now() - t0 };
    }
    await g.vm.stop({ timeoutMs: 10_000 });

    // Restore of each restore point, whole, to raw files.
    const restores: Record<string, { ms: number; bytes: number }> = {};
    for (const [label, repo] of [
      ["local", local],
      ["s3", s3],
    ] as const) {
      const t0 = Date.now();
      await st(repo, ["restore", backups[label]!.id, "--target", join(dir, `restored-${label}`)]);
      restores[label] = { ms: Date.now() - t0, bytes: backups[label]!.bytesRead };
    }
    await st(s3, ["verify", "--read-data"]);

    /** strata instant, timed until the guest's workload reported its first records. */
    const boot = async (repo: string, id: string, name: string) => {
      const t0 = Date.now();
      const s = summary<Described>(
        await st(repo, ["instant", id, "--name", name, "--target", join(dir, name), "--json"]),
      );
      started.push(s.vm.pid, s.serve.pid);
      const con = s.vm.console!;
      await until(`STRATA-GUEST-READY on ${name}'s console`, 180_000, async () =>
        /STRATA-GUEST-READY/.test(await readFile(con, "utf8").catch(() => "")) ? true : undefined,
      );
      const readyMs = Date.now() - t0;
      await until(`${name}'s workload`, 90_000, async () => ((await consoleSeq(con)) > 0 ? true : undefined));
      return { s, readyMs, workloadMs: Date.now() - t0 };
    };

    const fromLocal = await boot(local, backups.local!.id, "ir-local");
    await st(local, ["instant", "stop", "ir-local", "--discard"]);
    // From S3 twice: first with an empty cache (the restore above filled it, so it is emptied),
    // then with what the first boot read in the cache.
    await rm(env.STRATA_S3_CACHE_DIR, { recursive: true, force: true });
    const fromS3Cold = await boot(s3, backups.s3!.id, "ir-s3-cold");
    await st(s3, ["instant", "stop", "ir-s3-cold", "--discard"]);
    const fromS3 = await boot(s3, backups.s3!.id, "ir-s3");
    const con = fromS3.s.vm.console!;
    assert.match(await readFile(con, "utf8"), /mounted \/dev\/vdb on \/mnt\/data/);

    // Live migration to local storage while the workload writes.
    const prod = join(dir, "prod");
    const seqBefore = await consoleSeq(con);
    const m = summary<{ disks: Array<{ disk: string; path: string; readyMs: number }> }>(
      await st(s3, [
        "instant",
        "migrate",
        "ir-s3",
        "--target",
        prod,
        "--format",
        "raw",
        "--active",
        "--json",
      ]),
    );
    assert.deepEqual(
      m.disks.map((d) => d.path),
      [join(prod, "vblk0.raw"), join(prod, "vblk1.raw"), join(prod, "vblk2.raw")],
    );
    await until("the workload after the pivot", 90_000, async () =>
      (await consoleSeq(con)) > seqBefore + 60 ? true : undefined,
    );
    const last = await consoleSeq(con);
    await st(s3, ["instant", "stop", "ir-s3"]);
    await run("cmp", [filled, join(prod, "vblk2.raw")]);
    const rec = await verifyRecords(join(prod, "vblk0.raw"));
    assert.ok(
      rec.gapFree && rec.lastSeq >= last,
      `migrated: last ${rec.lastSeq} of ${last}, missing ${rec.missing}`,
    );

    const rate = (bytes: number, ms: number) => `${(bytes / MiB / (ms / 1000)).toFixed(1)} MiB/s`;
    t.diagnostic(
      `live backup of the test guest (${(backups.local!.bytesRead / MiB).toFixed(0)} MiB read), whole command: ` +
        `local ${backups.local!.ms} ms (${rate(backups.local!.bytesRead, backups.local!.ms)}), ` +
        `S3 ${backups.s3!.ms} ms (${rate(backups.s3!.bytesRead, backups.s3!.ms)})`,
    );
    t.diagnostic(
      `restore of its disks (256 MiB, ${(backups.local!.bytesRead / MiB).toFixed(0)} MiB of data) to raw files, whole command, data rate: local ${restores.local!.ms} ms ` +
        `(${rate(restores.local!.bytes, restores.local!.ms)}), S3 ${restores.s3!.ms} ms (${rate(restores.s3!.bytes, restores.s3!.ms)})`,
    );
    t.diagnostic(
      `instant recovery, strata instant to the guest ready / its workload running: local ${fromLocal.readyMs} / ${fromLocal.workloadMs} ms, ` +
        `S3 with an empty cache ${fromS3Cold.readyMs} / ${fromS3Cold.workloadMs} ms, S3 again (cache warm) ${fromS3.readyMs} / ${fromS3.workloadMs} ms; migration from S3 to local raw files: ${m.disks
          .map((d) => `${d.disk} ready in ${d.readyMs} ms`)
          .join(", ")}`,
    );
  });
});
