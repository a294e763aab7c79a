// A repository on read-only media, or one the user may only read, can be listed, verified,
// restored, browsed and served: readers write no lock there, and nothing in it changes.
// Read-only media: a read-only bind mount (EROFS; mount needs root, as the tests run). A
// read-only user: the CLI run as "nobody" through setpriv on a repository it can only read.
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { runProgram } from "../../src/util/process.js";
import {
  type RunOptions,
  type RunResult,
  startStrata,
  strata,
  strataOk,
  summary,
  tempDir,
} from "../helpers/cli.js";

const NOBODY = 65534;

/** Every file under `dir` with its size and mtime: a change shows. */
async function snapshotTree(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    for (const e of await fs.readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      const st = await fs.stat(p);
      out.push(`${p.slice(dir.length)} ${e.isDirectory() ? "dir" : st.size} ${st.mtimeMs}`);
      if (e.isDirectory()) await walk(p);
    }
  };
  await walk(dir);
  return out.sort();
}

function options(asNobody: boolean): RunOptions {
  return asNobody
    ? { prefix: ["setpriv", `--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", "--"] }
    : {};
}

function start(args: string[], asNobody: boolean): ChildProcess {
  return startStrata(args, options(asNobody));
}

function run(args: string[], asNobody: boolean): Promise<RunResult> {
  return strata(args, options(asNobody));
}

async function ok(args: string[], asNobody: boolean): Promise<RunResult> {
  const r = await run(args, asNobody);
  assert.equal(r.code, 0, `strata ${args.join(" ")}: ${r.stderr}`);
  return r;
}

for (const how of ["read-only bind mount", "user who may only read"] as const) {
  test(`a repository behind a ${how}: snapshots, verify, restore, files and serve work and write nothing`, async (t) => {
    const dir = tempDir(t);
    await fs.chmod(dir, 0o755);
    const repo = join(dir, "repo");
    const img = join(dir, "disk.img");
    const data = Buffer.alloc(8 * 65536);
    fillContent(data.subarray(0, 5 * 65536), "random", new Prng("ro"));
    await fs.writeFile(img, data);
    await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
    const id = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]))
      .id as string;

    const asNobody = how === "user who may only read";
    let ro = repo;
    if (asNobody) {
      await runProgram("chmod", ["-R", "a+rX,a-w", repo]);
    } else {
      ro = join(dir, "ro");
      await fs.mkdir(ro);
      await runProgram("mount", ["--bind", repo, ro]);
    }
    try {
      if (!asNobody) await runProgram("mount", ["-o", "remount,bind,ro", ro]);
      await readOnlyUse(t, dir, repo, ro, id, data, img, asNobody);
    } finally {
      // Undone here, before tempDir's removal (after-hooks run in the order they were added).
      if (asNobody) await runProgram("chmod", ["-R", "u+w", repo]);
      else await runProgram("umount", [ro]);
    }
  });
}

async function readOnlyUse(
  t: TestContext,
  dir: string,
  repo: string,
  ro: string,
  id: string,
  data: Buffer,
  img: string,
  asNobody: boolean,
): Promise<void> {
  const before = await snapshotTree(repo);
  const out = join(dir, "out");
  await fs.mkdir(out);
  if (asNobody) await fs.chown(out, NOBODY, NOBODY);

  // The case is real: a writer fails, saying why.
  const w = await run(["backup", "--repo", ro, "--vm", "vm1", "--json", `file:${img}`], asNobody);
  assert.equal(w.code, 1);
  assert.match(w.stderr, asNobody ? /"code":"PERMISSION_DENIED"/ : /"code":"READ_ONLY"/);

  const snaps = JSON.parse((await ok(["snapshots", "--repo", ro, "--json"], asNobody)).stdout) as unknown[];
  assert.equal(snaps.length, 1);
  await ok(["verify", "--repo", ro], asNobody);
  await ok(["verify", "--repo", ro, "--read-data"], asNobody);
  await ok(["restore", "--repo", ro, id, "--target", out], asNobody);
  assert.deepEqual(await fs.readFile(join(out, "disk.raw")), data);
  const ls = await ok(["files", "ls", "--repo", ro, id], asNobody);
  assert.match(ls.stdout, /disk/);

  const sockDir = join(dir, "run");
  await fs.mkdir(sockDir);
  if (asNobody) await fs.chown(sockDir, NOBODY, NOBODY);
  const sock = join(sockDir, "s.sock");
  const serve = start(["serve", "--repo", ro, id, "--socket", sock, "--json"], asNobody);
  const exited = new Promise<number | null>((r) => serve.once("exit", (c) => r(c)));
  let serveOut = "";
  let serveErr = "";
  serve.stdout!.on("data", (d: Buffer) => {
    serveOut += d.toString();
  });
  serve.stderr!.on("data", (d: Buffer) => {
    serveErr += d.toString();
  });
  t.after(async () => {
    if (serve.exitCode === null && serve.signalCode === null) {
      serve.kill("SIGKILL");
      await exited;
    }
  });
  const deadline = Date.now() + 15_000;
  while (!serveOut.includes('"type":"ready"')) {
    assert.ok(Date.now() < deadline && serve.exitCode === null, `serve did not start: ${serveErr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const copy = join(out, "served.raw");
  await runProgram("qemu-img", [
    "convert",
    "-f",
    "raw",
    `nbd+unix:///disk?socket=${sock}`,
    "-O",
    "raw",
    copy,
  ]);
  assert.deepEqual(await fs.readFile(copy), data);
  serve.kill("SIGTERM");
  assert.equal(await exited, 0, serveErr);

  assert.deepEqual(await snapshotTree(repo), before, "nothing in the repository changed");
  assert.equal(
    await fs.stat(join(repo, "locks")).then(
      async () => (await fs.readdir(join(repo, "locks"))).length,
      () => 0,
    ),
    0,
    "no lock left",
  );
}
