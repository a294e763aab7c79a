/**
 * The record of an instantly recovered VM, `<state dir>/instant/<name>.json`, and the serving
 * process it names.
 *
 * The engine owns the envelope: the restore point and repository, the serving process
 * (`strata serve`, detached, on DIR/run/nbd.sock), the exports it serves, the phase and a
 * migration in progress. The adapter owns `vm` (an {@link InstantVm}: its process, overlays and
 * its own `data`), which it checks when the record is read back. The record is written before
 * anything is started and after every step, so `list`, `stop`, `resume` and `migrate` work
 * from any shell, and a crash leaves a record naming what exists.
 *
 * Records of format version 1 (written before adapters, QEMU fields at the top level) are not
 * read: loading one fails with an error that says what to stop and remove by hand.
 */
import { spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import { dirname, join } from "node:path";
import { z } from "zod";
import type { InstantRuntime, InstantVm, NbdBackedDisk } from "../../hypervisor/adapter.js";
import type { AdapterRegistry } from "../../hypervisor/registry.js";
import { parseS3Url } from "../../repo/s3-url.js";
import { describeError, ErrorCode, isNotFound, StrataError } from "../../util/errors.js";
import { processRunsWith, socketAccepts, terminate } from "../../util/process.js";
import { absolutePath, list, object, oneOf, parseDocument, text, whole } from "../../util/schema.js";

/** Seconds a VM's NBD client holds requests while it reconnects to a restarted server. */
export const DEFAULT_RECONNECT_DELAY = 300;

export type InstantPhase = "starting" | "running" | "migrating" | "migrated" | "stopped";

export const INSTANT_RECORD_VERSION = 2;

/** The record of one instantly recovered VM. */
export interface InstantRecord {
  format: "strata-instant";
  version: 2;
  /** The name `strata instant` knows it by. */
  name: string;
  /** `vm/time` of the restore point. */
  restorePoint: string;
  repo: string;
  passwordFile?: string;
  clone: boolean;
  /** Directory of the overlays and run files (DIR/run). */
  dir: string;
  /** The serving process's unix socket. */
  socket: string;
  reconnectDelay: number;
  phase: InstantPhase;
  serve: { pid: number | null; log: string; command: string[] };
  /** What the serving process exports: one per disk. */
  exports: NbdBackedDisk[];
  /** The adapter's record of the running VM; null until the adapter first records it. */
  vm: InstantVm | null;
  /** The adapter that runs it (the restore point's configuration kind). */
  adapter: string;
  migration?: { target: string; format: "qcow2" | "raw"; limitBytes: number | null; finished?: string };
  created: string;
}

export function instantStateDir(stateDir: string): string {
  return join(stateDir, "instant");
}

function recordPath(name: string, stateDir: string): string {
  return join(instantStateDir(stateDir), `${name}.json`);
}

export async function saveInstantRecord(record: InstantRecord, stateDir: string): Promise<void> {
  const path = recordPath(record.name, stateDir);
  await fs.mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp`;
  await fs.writeFile(tmp, `${JSON.stringify(record, null, 2)}\n`);
  await fs.rename(tmp, path);
}

export async function removeInstantRecord(name: string, stateDir: string): Promise<void> {
  await fs.rm(recordPath(name, stateDir), { force: true });
}

/** The adapter's instant runtime for a record. */
export function runtimeOf(
  record: Pick<InstantRecord, "adapter" | "name">,
  adapters: AdapterRegistry,
): InstantRuntime {
  const runtime = adapters.adapter(record.adapter).instant;
  if (!runtime)
    throw new StrataError(
      ErrorCode.USAGE,
      `the ${record.adapter} adapter of "${record.name}" has no instant recovery`,
    );
  return runtime;
}

const PHASES = ["starting", "running", "migrating", "migrated", "stopped"] as const;

/** The engine's part of a record (`vm` is its adapter's, checked by it). */
const InstantRecordSchema = object(
  {
    format: z.literal("strata-instant", { error: "it is not a strata-instant record" }),
    version: z.literal(INSTANT_RECORD_VERSION, {
      error: (iss) => `its version ${JSON.stringify(iss.input)} is unknown`,
    }),
    name: text("the name"),
    restorePoint: text("the restore point"),
    // A local directory, or an S3 bucket (s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]).
    repo: z.union([
      absolutePath("the repository"),
      text("the repository").refine(
        (v) => {
          try {
            parseS3Url(v);
            return true;
          } catch {
            return false;
          }
        },
        {
          error: (iss) =>
            `the repository ${JSON.stringify(iss.input)} is neither an absolute path nor an s3: URL`,
        },
      ),
    ]),
    passwordFile: absolutePath("the password file").optional(),
    clone: z.boolean({ error: "clone is not true or false" }),
    dir: absolutePath("the directory"),
    socket: absolutePath("the NBD socket"),
    reconnectDelay: whole("the reconnect delay", 365 * 86400),
    phase: z.enum(PHASES, { error: (iss) => `the phase ${JSON.stringify(iss.input)} is unknown` }),
    serve: object(
      {
        pid: whole("the server's pid", 2 ** 31).nullable(),
        log: absolutePath("the server's log"),
        command: list(text("an argument of the server's command"), "the server's command", 100),
      },
      "the server",
    ),
    exports: list(
      object(
        {
          name: text("the export's disk name"),
          size: whole("the export's size", Number.MAX_SAFE_INTEGER),
          socket: absolutePath("the export's socket"),
          exportName: text("the export name"),
        },
        "the export",
      ),
      "the exports",
      1024,
    ),
    vm: z.record(z.string(), z.unknown(), { error: "the VM record is not an object or null" }).nullable(),
    adapter: text("the adapter"),
    migration: object(
      {
        target: absolutePath("the migration target"),
        format: oneOf(["qcow2", "raw"], "the migration format"),
        limitBytes: whole("the migration's bandwidth limit", Number.MAX_SAFE_INTEGER).nullable(),
        finished: text("the migration's end").optional(),
      },
      "the migration",
    ).optional(),
    created: text("the creation time"),
  },
  "the record",
);

/**
 * Checks a record as read from `file`: the envelope against its schema here, `vm` by its
 * adapter. A version 1 record gets an error saying what to do by hand.
 */
export function parseInstantRecord(doc: unknown, file: string, adapters: AdapterRegistry): InstantRecord {
  const r = doc as Record<string, unknown> | null;
  if (r?.format === "strata-instant" && r.version === 1) {
    const pids = (x: unknown) => (x as { pid?: unknown } | undefined)?.pid;
    throw new StrataError(
      ErrorCode.REPO_VERSION,
      `${file} was written by an earlier Strata (record version 1), which this one does not run: stop its QEMU (pid ${pids(r.qemu) ?? "?"}) and NBD server (pid ${pids(r.serve) ?? "?"}) if they run, keep or remove ${typeof r.dir === "string" ? r.dir : "its directory"}, then delete ${file}`,
    );
  }
  const parsed = parseDocument(InstantRecordSchema, doc, `the instant recovery record ${file} is damaged`);
  const record = { ...parsed, vm: null } as InstantRecord;
  if (parsed.vm !== null)
    record.vm = runtimeOf(record, adapters).checkRecord(parsed.vm as unknown as InstantVm);
  return record;
}

export async function loadInstantRecord(
  name: string,
  stateDir: string,
  adapters: AdapterRegistry,
): Promise<InstantRecord> {
  const file = recordPath(name, stateDir);
  let text: string;
  try {
    text = await fs.readFile(file, "utf8");
  } catch (err) {
    if (isNotFound(err))
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `no instantly recovered VM named "${name}" (see strata instant list; state in ${instantStateDir(stateDir)})`,
      );
    throw new StrataError(ErrorCode.EXTERNAL, `cannot read the record of "${name}": ${describeError(err)}`, {
      cause: err,
    });
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${file} is not JSON: ${describeError(err)}`);
  }
  return parseInstantRecord(doc, file, adapters);
}

/** Every record, and the files that could not be read as one (with why). */
export async function listInstantRecords(
  stateDir: string,
  adapters: AdapterRegistry,
): Promise<{ records: InstantRecord[]; unreadable: Array<{ file: string; error: string }> }> {
  const dir = instantStateDir(stateDir);
  const names = await fs.readdir(dir).catch((err: unknown) => {
    if (isNotFound(err)) return [] as string[];
    throw err;
  });
  const records: InstantRecord[] = [];
  const unreadable: Array<{ file: string; error: string }> = [];
  for (const n of names.filter((x) => x.endsWith(".json")).sort()) {
    try {
      records.push(await loadInstantRecord(n.slice(0, -".json".length), stateDir, adapters));
    } catch (err) {
      // A record removed meanwhile is not listed; a damaged or old one is named.
      if (!(err instanceof StrataError && err.code === ErrorCode.NOT_FOUND))
        unreadable.push({ file: join(dir, n), error: describeError(err) });
    }
  }
  return { records, unreadable };
}

/** The recorded serving process still runs (and is that server, not a process that reused its PID). */
export function serverRuns(record: InstantRecord): boolean {
  return processRunsWith(record.serve.pid, record.socket);
}

async function tail(path: string): Promise<string> {
  return (await fs.readFile(path, "utf8").catch(() => "")).trim().split("\n").slice(-5).join("\n");
}

/**
 * Starts the serving process (`command` is `strata serve ...` without `--socket`) detached, its
 * output in `log`, and waits until `socket` accepts connections.
 */
export async function startServer(
  command: readonly string[],
  socket: string,
  log: string,
  timeoutMs = 30_000,
): Promise<number> {
  await fs.mkdir(dirname(socket), { recursive: true });
  const fh = await fs.open(log, "a");
  const child = spawn(command[0]!, [...command.slice(1), "--socket", socket], {
    detached: true,
    stdio: ["ignore", fh.fd, fh.fd],
  });
  let exited: number | null | undefined;
  let failed: Error | undefined;
  child.once("exit", (code) => {
    exited = code;
  });
  child.once("error", (err) => {
    failed = err;
  });
  await fh.close();
  child.unref();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    await new Promise((r) => setTimeout(r, 25));
    if (failed)
      throw new StrataError(ErrorCode.EXTERNAL, `cannot start the NBD server: ${describeError(failed)}`, {
        cause: failed,
      });
    if (exited !== undefined)
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `the NBD server exited at start (code ${exited}): ${await tail(log)}`,
      );
    if (await socketAccepts(socket)) return child.pid!;
    if (Date.now() > deadline) {
      if (child.pid) await terminate(child.pid, 1000);
      throw new StrataError(
        ErrorCode.TIMEOUT,
        `the NBD server did not listen on ${socket} within ${timeoutMs / 1000} s: ${await tail(log)}`,
      );
    }
  }
}

/** The record for people and --json: what runs, where, and how far migrated. */
export async function describeInstant(r: InstantRecord, adapters: AdapterRegistry) {
  const vm = r.vm;
  const running = vm ? await runtimeOf(r, adapters).running(vm) : false;
  return {
    name: r.name,
    restorePoint: r.restorePoint,
    phase: r.phase,
    adapter: r.adapter,
    vm: { pid: vm?.pid ?? null, running, where: vm?.where ?? null, ...vm?.details } as {
      pid: number | null;
      running: boolean;
      where: string | null;
      /** The adapter's details: QEMU's qmpSocket, console, log; libvirt's domain, uri, console. */
      [detail: string]: string | number | boolean | null;
    },
    serve: { pid: r.serve.pid, running: serverRuns(r), socket: r.socket, log: r.serve.log },
    disks: r.exports.map((e) => {
      const d = vm?.disks.find((x) => x.name === e.name);
      return {
        name: e.name,
        size: e.size,
        overlay: d?.overlay ?? null,
        ...(d?.production ? { production: d.production.path, format: d.production.format } : {}),
      };
    }),
    dir: r.dir,
    warnings: vm?.warnings ?? [],
  };
}

/** The argv of `strata serve REF --repo R [--password-file F] --cache-size N`; `strata` is how to run strata. */
export function serveCommandLine(
  strata: readonly string[],
  ref: string,
  o: { repoArgs: readonly string[]; cacheSize: string; journal?: string },
): string[] {
  return [
    ...strata,
    "serve",
    ref,
    ...o.repoArgs,
    "--cache-size",
    o.cacheSize,
    ...(o.journal === undefined ? [] : ["--journal", o.journal]),
  ];
}
