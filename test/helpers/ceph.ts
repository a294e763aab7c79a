/**
 * A real S3 server for tests: a single-node Ceph cluster (one mon, one memstore osd) and a RADOS
 * Gateway, started from Debian's packages as plain processes in a temporary directory, and
 * stopped again by the test file that started it (one gateway per file: `before`/`after`).
 *
 * What is set and why (found out on this machine kind, see the Ceph notes in docs/architecture.md):
 *  - cluster auth off, `ms mon client mode = crc`: with auth off radosgw otherwise loops on -13.
 *    S3 request signatures are still checked.
 *  - `paxos propose interval` and `paxos min wait` small: the mon's default 1 s batching makes a
 *    cold start ~20 s; with them it takes a few seconds.
 *  - memstore with `osd fast shutdown = false`, a bounded device size (past the full ratio writes
 *    hang rather than fail) and every address on 127.0.0.1 in a port range of this cluster's own,
 *    so that two clusters (two test files) can run side by side.
 *  - `mon data avail crit = 0`: a mon exits at start when its file system has under 5 % free
 *    (it keeps a few MiB here), and every S3 test then failed on a nearly full disk.
 *  - order: mon, `ceph osd new`, osd, wait until the osd is active, user, then radosgw. Stop in
 *    reverse: radosgw before the osd. A mon that exits is reported with its own words.
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes, randomUUID } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before } from "node:test";
import { promisify } from "node:util";

const run = promisify(execFile);

export interface Gateway {
  /** http://127.0.0.1:PORT */
  readonly endpoint: string;
  readonly accessKeyId: string;
  readonly secretAccessKey: string;
  /** The cluster's directory (config, data, logs); every daemon's command line names it. */
  readonly dir: string;
  /** Milliseconds from the first command to a gateway answering. */
  readonly startMs: number;
  /** Runs radosgw-admin against this cluster. */
  admin(...args: string[]): Promise<string>;
  /** Stops radosgw, the osd and the mon (in that order) and removes the directory. */
  stop(): Promise<void>;
}

const BINARIES = ["monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph"];

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

/** A block of `n` consecutive free ports on 127.0.0.1, picked at random in 20000-59999. */
async function freePorts(n: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20000 + Math.floor(Math.random() * 2000) * 20;
    let ok = true;
    for (let p = base; p < base + n && ok; p++) ok = await portFree(p);
    if (ok) return base;
  }
  throw new Error(`no block of ${n} free ports on 127.0.0.1`);
}

async function waitFor(
  what: string,
  ms: number,
  check: () => Promise<boolean>,
  died?: () => string | undefined,
) {
  const end = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    const dead = died?.();
    if (dead) throw new Error(`${what}: ${dead}`);
    if (Date.now() > end) throw new Error(`${what}: not within ${ms / 1000} s`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Starts a cluster and a gateway with one S3 user whose keys are returned. */
export async function startGateway(options: { deviceBytes?: number } = {}): Promise<Gateway> {
  const missing = BINARIES.filter((b) => !["/usr/bin", "/usr/sbin"].some((d) => existsSync(join(d, b))));
  if (missing.length > 0)
    throw new Error(
      `Ceph is not installed (missing ${missing.join(", ")}): run scripts/setup.sh (scripts/deps/apt.txt)`,
    );
  const t0 = Date.now();
  const dir = await mkdtemp(join(tmpdir(), "strata-ceph-"));
  const base = await freePorts(20);
  const monPort = base;
  const rgwPort = base + 1;
  const fsid = randomUUID();
  const osdUuid = randomUUID();
  const conf = join(dir, "ceph.conf");
  for (const d of ["run", "log", "mon", "osd/0", "rgw"]) await mkdir(join(dir, d), { recursive: true });
  await writeFile(
    conf,
    `[global]
fsid = ${fsid}
mon host = v2:127.0.0.1:${monPort}
mon initial members = a
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms bind ipv4 = true
ms bind ipv6 = false
ms bind msgr1 = false
ms bind msgr2 = true
ms bind port min = ${base + 2}
ms bind port max = ${base + 19}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon warn on pool no redundancy = false
mon data avail crit = 0
paxos propose interval = 0.01
paxos min wait = 0.001
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
pid file = ${dir}/run/$name.pid
log file = ${dir}/log/$name.log
keyring = ${dir}/keyring
[mon.a]
mon data = ${dir}/mon/a
[osd.0]
osd data = ${dir}/osd/0
osd objectstore = memstore
memstore device bytes = ${options.deviceBytes ?? 1024 * 1024 * 1024}
osd fast shutdown = false
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:${rgwPort}
rgw data = ${dir}/rgw
`,
  );
  await writeFile(join(dir, "keyring"), "");
  const procs: { name: string; child: ChildProcess; exited: string | undefined }[] = [];
  const ceph = async (cmd: string, ...args: string[]) => {
    try {
      return (await run(cmd, ["-c", conf, ...args], { maxBuffer: 16 * 1024 * 1024, timeout: 60_000 })).stdout;
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw new Error(`${cmd} ${args.join(" ")}: ${(e.stderr || e.message).trim()}`);
    }
  };
  const daemon = (name: string, cmd: string, args: string[]) => {
    const child = spawn(cmd, ["-c", conf, "-f", ...args], { stdio: ["ignore", "ignore", "pipe"] });
    const p = { name, child, exited: undefined as string | undefined, stderr: "" };
    child.stderr?.on("data", (d: Buffer) => {
      p.stderr = (p.stderr + d.toString()).slice(-4000);
    });
    child.once("exit", (code, sig) => {
      p.exited = `${name} exited (${sig ?? code}) ${p.stderr.trim()} (logs in ${dir}/log)`;
    });
    procs.push(p);
    return p;
  };
  const stopAll = async () => {
    // radosgw first, then the osd, then the mon: the reverse of the start.
    for (const p of [...procs].reverse()) {
      if (p.exited !== undefined) continue;
      const gone = new Promise<void>((r) => p.child.once("exit", () => r()));
      p.child.kill("SIGTERM");
      const timer = setTimeout(() => p.child.kill("SIGKILL"), 10_000);
      await gone;
      clearTimeout(timer);
    }
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await ceph(
      "monmaptool",
      "--create",
      "--fsid",
      fsid,
      "--addv",
      "a",
      `[v2:127.0.0.1:${monPort}]`,
      join(dir, "monmap"),
    );
    await ceph("ceph-mon", "--mkfs", "-i", "a", "--monmap", join(dir, "monmap"));
    await ceph("ceph-osd", "-i", "0", "--mkfs", "--no-mon-config", "--osd-uuid", osdUuid);
    const mon = daemon("ceph-mon", "ceph-mon", ["-i", "a"]);
    // A mon that refuses to start (it exits at once) would leave this waiting out its timeout.
    const monDied = new Promise<never>((_, reject) =>
      mon.child.once("exit", () => setImmediate(() => reject(new Error(mon.exited)))),
    );
    monDied.catch(() => {});
    await Promise.race([ceph("ceph", "--connect-timeout", "30", "osd", "new", osdUuid, "0"), monDied]);
    const osd = daemon("ceph-osd", "ceph-osd", ["-i", "0"]);
    const osdLog = join(dir, "log", "osd.0.log");
    await waitFor(
      "the osd did not become active",
      60_000,
      async () => (await readFile(osdLog, "utf8").catch(() => "")).includes("state: booting -> active"),
      () => osd.exited ?? mon.exited,
    );
    const accessKeyId = `STRATA${randomBytes(7).toString("hex").toUpperCase()}`;
    const secretAccessKey = randomBytes(20).toString("base64url");
    await ceph(
      "radosgw-admin",
      "user",
      "create",
      "--uid=strata",
      "--display-name=strata",
      `--access-key=${accessKeyId}`,
      `--secret-key=${secretAccessKey}`,
    );
    const rgw = daemon("radosgw", "radosgw", ["-n", "client.rgw"]);
    const endpoint = `http://127.0.0.1:${rgwPort}`;
    await waitFor(
      "radosgw did not answer",
      60_000,
      async () => {
        try {
          const res = await fetch(endpoint, { signal: AbortSignal.timeout(2000) });
          await res.arrayBuffer();
          return true;
        } catch {
          return false;
        }
      },
      () => rgw.exited ?? osd.exited ?? mon.exited,
    );
    return {
      endpoint,
      accessKeyId,
      secretAccessKey,
      dir,
      startMs: Date.now() - t0,
      admin: (...args) => ceph("radosgw-admin", ...args),
      stop: stopAll,
    };
  } catch (err) {
    const logs = await readFile(join(dir, "log", "osd.0.log"), "utf8").catch(() => "");
    await stopAll();
    throw Object.assign(err as Error, { osdLogTail: logs.slice(-2000) });
  }
}

/**
 * One gateway for a test file: started before its tests, stopped after them, and checked to
 * leave nothing running. Returns the gateway (call it from within a test).
 */
export function gatewayForFile(): () => Gateway {
  let gw: Gateway | undefined;
  before(async () => {
    gw = await startGateway();
  });
  after(async () => {
    if (!gw) return;
    await gw.stop();
    assert.deepEqual(await processesUsing(gw.dir), [], "nothing of the cluster is left running");
  });
  return () => {
    if (!gw) throw new Error("the test gateway has not started");
    return gw;
  };
}

/** PIDs of processes whose command line names `dir` (what a stopped cluster must not leave). */
export async function processesUsing(dir: string): Promise<number[]> {
  try {
    const { stdout } = await run("pgrep", ["-f", dir]);
    return stdout.split("\n").filter(Boolean).map(Number);
  } catch (err) {
    if ((err as { code?: number }).code === 1) return [];
    throw err;
  }
}

/**
 * Creates a bucket (with a fresh name unless given) on the gateway and returns its name. With
 * `objectLock` the bucket has S3 Object Lock (and so versioning) enabled.
 */
export async function createBucket(
  gw: Gateway,
  name = `strata-${randomBytes(6).toString("hex")}`,
  options: { objectLock?: boolean } = {},
): Promise<string> {
  const { CreateBucketCommand } = await import("@aws-sdk/client-s3");
  const client = await s3Client(gw);
  try {
    await client.send(
      new CreateBucketCommand({
        Bucket: name,
        ...(options.objectLock ? { ObjectLockEnabledForBucket: true } : {}),
      }),
    );
  } finally {
    client.destroy();
  }
  return name;
}

/** An S3 client of the gateway, as its first user (the owner of the buckets tests create) or as `as`. */
export async function s3Client(
  gw: Gateway,
  as: { accessKeyId: string; secretAccessKey: string } = gw,
): Promise<import("@aws-sdk/client-s3").S3Client> {
  const { S3Client } = await import("@aws-sdk/client-s3");
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  return new S3Client({
    endpoint: gw.endpoint,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: { accessKeyId: as.accessKeyId, secretAccessKey: as.secretAccessKey },
    requestChecksumCalculation: "WHEN_REQUIRED",
  });
}

/** Creates another gateway user and returns its uid and keys. */
export async function createUser(
  gw: Gateway,
  uid: string,
): Promise<{ uid: string; accessKeyId: string; secretAccessKey: string }> {
  const accessKeyId = `STRATA${randomBytes(7).toString("hex").toUpperCase()}`;
  const secretAccessKey = randomBytes(20).toString("base64url");
  await gw.admin(
    "user",
    "create",
    `--uid=${uid}`,
    `--display-name=${uid}`,
    `--access-key=${accessKeyId}`,
    `--secret-key=${secretAccessKey}`,
  );
  return { uid, accessKeyId, secretAccessKey };
}

/** The environment a strata process needs to reach the gateway as its user. */
export function gatewayEnv(gw: Gateway): Record<string, string> {
  return { AWS_ACCESS_KEY_ID: gw.accessKeyId, AWS_SECRET_ACCESS_KEY: gw.secretAccessKey };
}
