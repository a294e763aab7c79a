// The REST API's data routes over real HTTP against real repositories: each role allowed and
// refused for every new route (refusals logged); browsing an ext4 disk of a restore point (layout,
// directory pages), a file downloaded byte for byte, a folder as a tar that lists right; a restore
// run followed over server-sent events to a bit-exact image; forget and gc (a run); and a restore
// point carrying a QEMU configuration (made in-process, like a live backup's, over a random disk):
// its configuration downloaded, restored in place and as a clone bit-exact, booted by instant
// recovery (QEMU, TCG, no guest OS: the firmware finds nothing to boot and waits), migrated at a
// speed limit to a bit-exact file, and stopped with nothing left running.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { promises as fs, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { rebuildRestorePoints } from "../../src/catalog/rebuild.js";
import { allows } from "../../src/catalog/roles.js";
import { ROLES } from "../../src/catalog/schema.js";
import { backup } from "../../src/engine/backup.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { makeExt4 } from "../files/images.js";
import { type Harness, harness, tokens } from "./api-harness.js";

const run = promisify(execFile);
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** The run's event stream, read to its end; the run as the `end` event recorded it. */
async function follow(h: Harness, runId: number, token: string) {
  const r = await h.call("GET", `/api/v1/runs/${runId}/events`, { token });
  assert.equal(r.status, 200, r.text);
  const end = /event: end\ndata: (.*)\n/.exec(r.text);
  assert.ok(end, `the stream ends with an end event: ${r.text}`);
  return {
    run: (JSON.parse(end[1]!) as { run: { outcome: string; error: string | null } }).run,
    text: r.text,
  };
}

function alive(pid: number | null | undefined): boolean {
  if (!pid) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.charAt(stat.lastIndexOf(")") + 2) !== "Z";
  } catch {
    return false;
  }
}

test("every data route is allowed and refused by role, each refusal logged", async (t) => {
  const h = await harness(t);
  const tok = tokens(h);
  // Targets that do not exist: an allowed call gets past the role check and fails on the target.
  const calls: Array<[string, string, Parameters<typeof allows>[1], unknown?]> = [
    ["POST", "/api/v1/restore-points/nosuch/latest/restore", "restore.start", { target: "relative" }],
    ["GET", "/api/v1/restore-points/nosuch/latest/config", "files.read"],
    ["GET", "/api/v1/restore-points/nosuch/latest/layout", "files.read"],
    ["GET", "/api/v1/restore-points/nosuch/latest/files?path=/", "files.read"],
    ["GET", "/api/v1/restore-points/nosuch/latest/download?path=/etc", "files.read"],
    ["DELETE", "/api/v1/restore-points/nosuch/latest", "forget.run"],
    ["POST", "/api/v1/repositories/nosuch/gc", "gc.run", {}],
    ["POST", "/api/v1/restore-points/nosuch/latest/instant", "instant.manage", {}],
    ["GET", "/api/v1/instant", "instant.list"],
    ["GET", "/api/v1/instant/nosuch", "instant.list"],
    ["POST", "/api/v1/instant/nosuch/migrate", "instant.manage", { target: "/nowhere" }],
    ["POST", "/api/v1/instant/nosuch/stop", "instant.manage", {}],
  ];
  for (const role of ROLES)
    for (const [method, path, action, body] of calls) {
      const r = await h.call(method, path, { token: tok[role], ...(body === undefined ? {} : { body }) });
      if (allows(role, action))
        assert.ok(
          [200, 400, 404].includes(r.status),
          `${role} may ${action}: ${method} ${path} gave ${r.status} ${r.text}`,
        );
      else {
        assert.equal(r.status, 403, `${role} may not ${action}: ${method} ${path} gave ${r.status}`);
        assert.ok(
          h.logs.some(
            (l) =>
              l.includes(`refused ${method} ${path.split("?")[0]}`) && l.includes(`may not do ${action}`),
          ),
          `the refusal of ${action} to ${role} is logged`,
        );
      }
    }
  // What the roles come to: read sees metadata only; backup only adds restore points.
  for (const a of ["restore.start", "files.read", "instant.manage", "forget.run", "gc.run"] as const) {
    assert.equal(allows("read", a), false);
    assert.equal(allows("backup", a), false);
    assert.equal(allows("admin", a), true);
  }
  for (const a of ["restore.start", "files.read", "instant.manage"] as const)
    assert.equal(allows("operator", a), true);
  assert.equal(allows("read", "instant.list"), true);
  // A body is bounded and checked field by field.
  const big = await h.call("POST", "/api/v1/repositories/main/gc", {
    token: tok.admin,
    body: { graceSeconds: 1, pad: "x".repeat(70_000) },
  });
  assert.equal(big.status, 400);
  assert.match(big.text, /larger than 65536 bytes/);
  const unknown = await h.call("POST", "/api/v1/repositories/main/gc", {
    token: tok.admin,
    body: { grace: 1 },
  });
  assert.equal(unknown.status, 400);
  assert.match(unknown.text, /unknown field \\"grace\\"/);
});

test("files of an ext4 disk: layout, pages, a file and a folder downloaded; a restore run bit-exact; forget; gc", async (t) => {
  const big = randomBytes(300 * 1024 + 17);
  const h = await harness(t, {
    prepare: async (s) => {
      const tree = join(s.dir, "tree");
      await fs.mkdir(join(tree, "data", "sub"), { recursive: true });
      await fs.mkdir(join(tree, "etc"));
      await fs.writeFile(join(tree, "etc", "hosts"), "127.0.0.1 localhost\n");
      await fs.writeFile(join(tree, "data", "big.bin"), big);
      await fs.writeFile(join(tree, "data", "sub", "a.txt"), "a\n");
      await fs.symlink("../etc/hosts", join(tree, "data", "hosts-link"));
      for (let i = 0; i < 5; i++) await fs.writeFile(join(tree, `f${i}`), `${i}\n`);
      await makeExt4(s.images.vm1!, 16 << 20, tree);
    },
  });
  const tok = tokens(h);
  const job = h.s.catalog.jobs().find((j) => j.kind === "backup")!;
  assert.equal((await h.call("POST", `/api/v1/jobs/${job.id}/run`, { token: tok.backup })).status, 202);
  await h.daemon.idle();
  const point = h.s.catalog.restorePoints({ vm: "vm1" }).at(-1)!;
  const base = `/api/v1/restore-points/vm1/${encodeURIComponent(point.time)}`;

  const layout = await h.call("GET", `${base}/layout`, { token: tok.operator });
  assert.equal(layout.status, 200, layout.text);
  const disks = (layout.body as { disks: Array<{ disk: string; partitions: Array<{ filesystem: string }> }> })
    .disks;
  assert.equal(disks.length, 1);
  assert.equal(disks[0]!.partitions[0]!.filesystem, "ext4");
  const disk = disks[0]!.disk;

  // The root, two entries a page.
  const names: string[] = [];
  let offset: number | null = 0;
  let pages = 0;
  while (offset !== null) {
    const r = await h.call("GET", `${base}/files?path=/&limit=2&offset=${offset}`, { token: tok.operator });
    assert.equal(r.status, 200, r.text);
    const page = r.body as {
      total: number;
      nextOffset: number | null;
      entries: Array<{ name: string }>;
      filesystem: string;
    };
    assert.equal(page.filesystem, "ext4");
    assert.ok(page.entries.length <= 2);
    names.push(...page.entries.map((e) => e.name));
    offset = page.nextOffset;
    pages++;
  }
  assert.deepEqual(names, ["data", "etc", "f0", "f1", "f2", "f3", "f4", "lost+found"]);
  assert.equal(pages, 4);
  const dataDir = await h.call("GET", `${base}/files?path=/data`, { token: tok.admin });
  const entries = (
    dataDir.body as {
      entries: Array<{ name: string; kind: string; size: number; mtime: number; target?: string }>;
    }
  ).entries;
  assert.deepEqual(
    entries.map((e) => [e.name, e.kind]),
    [
      ["big.bin", "file"],
      ["hosts-link", "symlink"],
      ["sub", "directory"],
    ],
  );
  assert.equal(entries[0]!.size, big.length);
  assert.ok(Math.abs(entries[0]!.mtime - Date.now()) < 3_600_000, "mtime in milliseconds");
  assert.equal(entries[1]!.target, "../etc/hosts");
  assert.equal((await h.call("GET", `${base}/files?path=/nope`, { token: tok.admin })).status, 404);
  assert.equal((await h.call("GET", `${base}/files?path=relative`, { token: tok.admin })).status, 400);
  assert.equal((await h.call("GET", `${base}/files?path=/`, { token: tok.read })).status, 403);

  // A file, byte for byte.
  const file = await h.call("GET", `${base}/download?path=/data/big.bin`, { token: tok.operator });
  assert.equal(file.status, 200);
  assert.equal(file.headers["content-type"], "application/octet-stream");
  assert.equal(Number(file.headers["content-length"]), big.length);
  assert.match(String(file.headers["content-disposition"]), /filename="big\.bin"/);
  assert.equal(sha(file.bytes), sha(big));
  // A folder, as a tar that lists right and extracts to the same bytes.
  const tar = await h.call("GET", `${base}/download?path=/data&fs=${encodeURIComponent(disk)}`, {
    token: tok.operator,
  });
  assert.equal(tar.status, 200);
  assert.equal(tar.headers["content-type"], "application/x-tar");
  const tarFile = join(h.s.dir, "data.tar");
  await fs.writeFile(tarFile, tar.bytes);
  const listed = (await run("tar", ["-tf", tarFile])).stdout.split("\n").filter(Boolean).sort();
  assert.deepEqual(listed, ["data/", "data/big.bin", "data/hosts-link", "data/sub/", "data/sub/a.txt"]);
  const x = join(h.s.dir, "x");
  await fs.mkdir(x);
  await run("tar", ["-xf", tarFile, "-C", x]);
  assert.equal(sha(await fs.readFile(join(x, "data", "big.bin"))), sha(big));
  assert.equal(await fs.readlink(join(x, "data", "hosts-link")), "../etc/hosts");

  // A restore run, followed to its end, bit-exact.
  const target = join(h.s.dir, "restored");
  assert.equal((await h.call("POST", `${base}/restore`, { token: tok.read, body: { target } })).status, 403);
  assert.equal(
    (await h.call("POST", `${base}/restore`, { token: tok.backup, body: { target } })).status,
    403,
  );
  const bad = await h.call("POST", `${base}/restore`, { token: tok.operator, body: { name: "clone" } });
  assert.equal(bad.status, 400);
  assert.match(bad.text, /--name names a clone/);
  const started = await h.call("POST", `${base}/restore`, { token: tok.operator, body: { target } });
  assert.equal(started.status, 202, started.text);
  const runId = (started.body as { id: number }).id;
  const { run: ended, text } = await follow(h, runId, tok.read);
  assert.equal(ended.outcome, "success", ended.error ?? "");
  assert.match(text, /event: log\ndata: .*restore of vm1\//);
  const restored = await fs.readFile(join(target, `${disk}.raw`));
  assert.equal(
    sha(restored),
    sha(await fs.readFile(h.s.images.vm1!)),
    "the restored disk is the image, bit for bit",
  );
  const recorded = (await h.call("GET", `/api/v1/runs/${runId}`, { token: tok.read })).body as {
    restorePoint: string;
    bytesRead: number;
  };
  assert.equal(recorded.restorePoint, `vm1/${point.time}`);
  assert.equal(recorded.bytesRead, 16 << 20);
  // Again over the same file: refused without force, the run fails with the reason.
  const again = await h.call("POST", `${base}/restore`, { token: tok.admin, body: { target } });
  const refused = await follow(h, (again.body as { id: number }).id, tok.admin);
  assert.equal(refused.run.outcome, "failed");
  assert.match(refused.run.error ?? "", /exists/);

  // Forget (admin only), then gc as a run frees the chunks.
  assert.equal((await h.call("DELETE", base, { token: tok.operator })).status, 403);
  const forgot = await h.call("DELETE", base, { token: tok.admin });
  assert.equal(forgot.status, 200, forgot.text);
  assert.deepEqual((forgot.body as { removed: string[] }).removed, [`vm1/${point.time}`]);
  assert.equal(h.s.catalog.restorePoints({ vm: "vm1" }).length, 0);
  assert.equal((await h.call("GET", `${base}/layout`, { token: tok.admin })).status, 404);
  // Packs no restore point needs are condemned by one gc and deleted by the next.
  const gcRuns: string[] = [];
  for (let i = 0; i < 2; i++) {
    const g = await h.call("POST", "/api/v1/repositories/main/gc", {
      token: tok.admin,
      body: { graceSeconds: 0 },
    });
    assert.equal(g.status, 202, g.text);
    const gcRun = await follow(h, (g.body as { id: number }).id, tok.admin);
    assert.equal(gcRun.run.outcome, "success", gcRun.run.error ?? "");
    gcRuns.push(gcRun.text);
  }
  assert.match(gcRuns[0]!, /condemned [1-9]\d* /);
  const freed = /gc deleted [1-9]\d* pack\(s\) \(([1-9]\d*) bytes freed\)/.exec(gcRuns[1]!);
  assert.ok(freed, gcRuns[1]);
});

const SIZE = 16 << 20;

/** A restore point of VM q1 as a live QEMU backup makes it: its disk's bytes and its configuration. */
async function qemuPoint(h: Harness, data: Buffer): Promise<string> {
  const file = join(h.s.dir, "vms", "q1", "vblk0.raw");
  const config = {
    kind: "qemu",
    name: "q1",
    uuid: null,
    machine: null,
    cpus: 1,
    memoryBytes: 64 * 2 ** 20,
    disks: [{ name: "vblk0", node: "disk0", device: "vblk0", format: "raw", file, size: SIZE }],
    nics: [],
    firmware: null,
    commandLine: [
      "qemu-system-x86_64",
      "-blockdev",
      `driver=file,filename=${file},node-name=disk0-file`,
      "-blockdev",
      "driver=raw,file=disk0-file,node-name=disk0",
      "-device",
      "virtio-blk-pci,drive=disk0,id=vblk0",
    ],
  };
  const repo = await Repository.open(new FsStore(h.s.repoPath));
  try {
    const r = await backup(repo, {
      vm: "q1",
      disks: [
        {
          name: "vblk0",
          source: "memory",
          size: SIZE,
          read: async (offset, length) => data.subarray(offset, offset + length),
        },
      ],
      mode: "snapshot",
      consistency: "crash-consistent",
      config: Buffer.from(JSON.stringify(config)),
    });
    await rebuildRestorePoints(h.s.catalog, repo);
    return r.id;
  } finally {
    await repo.close();
  }
}

test("a QEMU restore point: configuration, restore in place and as a clone, instant start, migrate, stop", {
  timeout: 300_000,
}, async (t) => {
  const h = await harness(t);
  const tok = tokens(h);
  const data = randomBytes(SIZE);
  const id = await qemuPoint(h, data);
  const base = `/api/v1/restore-points/${id.split("/")[0]}/${encodeURIComponent(id.split("/")[1]!)}`;

  // The configuration, as JSON and as a QEMU command line for a clone; data, so not for read.
  assert.equal((await h.call("GET", `${base}/config`, { token: tok.read })).status, 403);
  const json = await h.call("GET", `${base}/config`, { token: tok.operator });
  assert.equal(json.status, 200, json.text);
  assert.equal((json.body as { name: string }).name, "q1");
  assert.match(String(json.headers["content-disposition"]), /filename="q1\.json"/);
  const cloneDir = join(h.s.dir, "clone");
  const args = await h.call(
    "GET",
    `${base}/config?as=qemu-args&target=${encodeURIComponent(cloneDir)}&name=q1b`,
    { token: tok.operator },
  );
  assert.equal(args.status, 200, args.text);
  assert.match(args.text, /qemu-system-x86_64/);
  assert.match(args.text, /-uuid [0-9a-f-]{36} /);
  assert.ok(args.text.includes(cloneDir), "the clone's disks are in its directory");

  // In place: the disk goes back to its recorded path, over production: admin only.
  const notOperator = await h.call("POST", `${base}/restore`, { token: tok.operator, body: {} });
  assert.equal(notOperator.status, 403, notOperator.text);
  assert.match(notOperator.text, /may not do restore\.in-place/);
  const oneDisk = await h.call("POST", `${base}/restore`, { token: tok.operator, body: { disk: "vblk0" } });
  assert.equal(oneDisk.status, 403, oneDisk.text);
  assert.ok(h.logs.some((l) => l.includes(`refused POST ${base}/restore`) && l.includes("restore.in-place")));
  const inPlace = await h.call("POST", `${base}/restore`, { token: tok.admin, body: {} });
  assert.equal(inPlace.status, 202, inPlace.text);
  const r1 = await follow(h, (inPlace.body as { id: number }).id, tok.admin);
  assert.equal(r1.run.outcome, "success", r1.run.error ?? "");
  assert.equal(sha(await fs.readFile(join(h.s.dir, "vms", "q1", "vblk0.raw"))), sha(data));
  // As a clone with a new name in a directory.
  const clone = await h.call("POST", `${base}/restore`, {
    token: tok.operator,
    body: { target: cloneDir, name: "q1b" },
  });
  const r2 = await follow(h, (clone.body as { id: number }).id, tok.operator);
  assert.equal(r2.run.outcome, "success", r2.run.error ?? "");
  const raws = (await fs.readdir(cloneDir)).filter((f) => f.endsWith(".raw"));
  assert.equal(raws.length, 1);
  assert.equal(sha(await fs.readFile(join(cloneDir, raws[0]!))), sha(data));
  assert.match(r2.text, /defined in .*q1b/);

  // Instant recovery: start, status, migrate at a speed limit, stop.
  const pids: number[] = [];
  t.after(() => {
    for (const pid of pids) if (alive(pid)) process.kill(pid, "SIGKILL");
  });
  const irDir = join(h.s.dir, "ir");
  const s = await h.call("POST", `${base}/instant`, {
    token: tok.operator,
    body: { name: "ir1", target: irDir },
  });
  assert.equal(s.status, 201, s.text);
  const st = s.body as {
    name: string;
    phase: string;
    vm: { pid: number; running: boolean };
    serve: { pid: number; running: boolean };
  };
  pids.push(st.vm.pid, st.serve.pid);
  assert.equal(st.name, "ir1");
  assert.equal(st.vm.running, true);
  assert.equal(st.serve.running, true);
  assert.ok(alive(st.vm.pid) && alive(st.serve.pid));
  const taken = await h.call("POST", `${base}/instant`, {
    token: tok.operator,
    body: { name: "ir1", target: irDir },
  });
  assert.equal(taken.status, 409, taken.text);
  const list = await h.call("GET", "/api/v1/instant", { token: tok.read });
  assert.deepEqual(
    (list.body as Array<{ name: string }>).map((x) => x.name),
    ["ir1"],
  );
  assert.equal((await h.call("GET", "/api/v1/instant/ir1", { token: tok.read })).status, 200);
  assert.equal((await h.call("POST", "/api/v1/instant/ir1/stop", { token: tok.read, body: {} })).status, 403);

  // Migration targets are bound by api.restore-targets (here the test's directory).
  const elsewhere = await fs.mkdtemp(join(tmpdir(), "strata-elsewhere-"));
  t.after(() => fs.rm(elsewhere, { recursive: true, force: true }));
  await fs.symlink(elsewhere, join(h.s.dir, "escape"));
  for (const target of [`${h.s.dir}/../${basename(elsewhere)}`, join(h.s.dir, "escape", "prod"), elsewhere]) {
    const r = await h.call("POST", "/api/v1/instant/ir1/migrate", {
      token: tok.admin,
      body: { target, format: "raw" },
    });
    assert.equal(r.status, 403, `${target}: ${r.text}`);
    assert.match(r.text, /api\.restore-targets/);
  }
  assert.deepEqual(await fs.readdir(elsewhere), [], "nothing was written outside");

  const prod = join(h.s.dir, "prod");
  const t0 = Date.now();
  const m = await h.call("POST", "/api/v1/instant/ir1/migrate", {
    token: tok.operator,
    body: { target: prod, format: "raw", limitMiBps: 4 },
  });
  assert.equal(m.status, 202, m.text);
  const mr = await follow(h, (m.body as { id: number }).id, tok.operator);
  const seconds = (Date.now() - t0) / 1000;
  assert.equal(mr.run.outcome, "success", mr.run.error ?? "");
  assert.ok(seconds >= 2, `16 MiB at 4 MiB/s takes more than 2 s, not ${seconds} s`);
  assert.equal(sha((await fs.readFile(join(prod, "vblk0.raw"))).subarray(0, SIZE)), sha(data));
  const after = (await h.call("GET", "/api/v1/instant/ir1", { token: tok.read })).body as {
    phase: string;
    serve: { running: boolean };
  };
  assert.equal(after.phase, "migrated");
  assert.equal(after.serve.running, false);

  const stop = await h.call("POST", "/api/v1/instant/ir1/stop", {
    token: tok.operator,
    body: { discard: true },
  });
  assert.equal(stop.status, 200, stop.text);
  assert.notEqual((stop.body as { vm: string }).vm, "not running");
  for (const pid of pids) assert.equal(alive(pid), false, `pid ${pid} is gone`);
  assert.deepEqual((await h.call("GET", "/api/v1/instant", { token: tok.read })).body, []);
  console.log(
    `instant: started in ${(s.body as { startMs: number }).startMs} ms; 16 MiB migrated at 4 MiB/s in ${seconds.toFixed(1)} s`,
  );
});
