/**
 * The REST API's routes on data: restore (a tracked run), a restore point's VM configuration,
 * browsing a restore point's disks and downloading a file or a folder (as tar), instant recovery
 * (start, status, migrate as a tracked run, stop), forget, and gc as a tracked run.
 *
 * A restore point is named in the path as {vm}/{time} ("latest" for the newest); the repository
 * is `?repository=NAME` or, when left out, the one the catalog has it in (or the only one
 * configured). Everything here is the engine's: the CLI and the API run the same code.
 *
 * Bounds: request bodies are JSON of at most 64 KiB with known fields only; pages of a directory
 * at most 1000 entries; a download streams with backpressure and stops when the client goes.
 */
import type { IncomingMessage } from "node:http";
import { join, resolve } from "node:path";
import { rebuildRestorePoints } from "../catalog/rebuild.js";
import { allows } from "../catalog/roles.js";
import {
  FILES_CACHE_BYTES,
  FileBrowser,
  type FsSelection,
  parseSelection,
  restorePointLayout,
  streamFile,
  tarFiles,
} from "../engine/files/index.js";
import { stopInstant } from "../engine/instant/control.js";
import { migrateInstant } from "../engine/instant/migrate.js";
import { startInstant } from "../engine/instant/start.js";
import {
  describeInstant,
  instantStateDir,
  listInstantRecords,
  loadInstantRecord,
  serveCommandLine,
} from "../engine/instant/state.js";
import { checkRestoreOptions, restorePoint } from "../engine/point-restore.js";
import { planVmRestore, readVmConfig, renderVmConfig } from "../engine/vm-restore.js";
import type { AdapterRegistry } from "../hypervisor/registry.js";
import { forgetIds, gc } from "../repo/prune.js";
import { checkName, type Repository, type SnapshotRef } from "../repo/repository.js";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import type { Route } from "./api.js";
import { type RepositoryConfig, repoArgs } from "./config.js";
import { confineDevice, confineDirectory } from "./restore-targets.js";
import { openRepository } from "./runner.js";
import type { Daemon } from "./service.js";

/** What the data routes need beside the daemon. */
export interface DataOptions {
  /** The platform adapters (the CLI's composition root builds them). */
  registry: AdapterRegistry;
  /** Where instant recovery keeps its records (the daemon's state-dir). */
  stateDir: string;
  /** How to run strata (argv: node and the script), for the detached `strata serve` of instant recovery. */
  strataCommand: readonly string[];
}

/** The largest JSON body a call may send. */
export const MAX_BODY_BYTES = 64 * 1024;

type Call = Parameters<Route["handle"]>[0];

/** The JSON object body of `req`, bounded, with only `fields` allowed. */
export async function readBody(
  req: IncomingMessage,
  fields: Record<string, "string" | "boolean" | "number">,
): Promise<Record<string, string | boolean | number>> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req as AsyncIterable<Buffer>) {
    n += c.length;
    if (n > MAX_BODY_BYTES)
      throw new StrataError(ErrorCode.USAGE, `the request body is larger than ${MAX_BODY_BYTES} bytes`);
    chunks.push(c);
  }
  const text = Buffer.concat(chunks).toString("utf8").trim();
  if (text === "") return {};
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new StrataError(ErrorCode.USAGE, `the request body is not JSON: ${describeError(err)}`);
  }
  if (typeof doc !== "object" || doc === null || Array.isArray(doc))
    throw new StrataError(ErrorCode.USAGE, "the request body must be a JSON object");
  const out: Record<string, string | boolean | number> = {};
  for (const [k, v] of Object.entries(doc)) {
    const want = fields[k];
    if (want === undefined)
      throw new StrataError(
        ErrorCode.USAGE,
        `unknown field "${k}" in the request body (known: ${Object.keys(fields).join(", ") || "none"})`,
      );
    if (v === null) continue;
    if (typeof v !== want) throw new StrataError(ErrorCode.USAGE, `field "${k}" must be a ${want}`);
    if (want === "string" && (v as string).length > 4096)
      throw new StrataError(ErrorCode.USAGE, `field "${k}" is longer than 4096 characters`);
    out[k] = v as string | boolean | number;
  }
  return out;
}

const str = (v: unknown) => (typeof v === "string" ? v : undefined);

/** An absolute path on the host, from a body field. */
function hostPath(v: unknown, field: string): string | undefined {
  const s = str(v);
  if (s === undefined) return undefined;
  if (!s.startsWith("/") || s.includes("\0"))
    throw new StrataError(ErrorCode.USAGE, `field "${field}" must be an absolute path on the host`);
  return resolve(s);
}

/** An AbortSignal that fires when the client goes away before the answer is complete. */
function clientGone(call: Call): AbortSignal {
  const c = new AbortController();
  call.res.on("close", () => {
    if (!call.res.writableFinished)
      c.abort(new StrataError(ErrorCode.ABORTED, "the client closed the connection"));
  });
  return c.signal;
}

/** A file name for Content-Disposition: plain ASCII, no quotes. */
function attachment(name: string): string {
  const plain = name.replace(/[^A-Za-z0-9._-]/g, "_").slice(0, 200) || "download";
  return `attachment; filename="${plain}"; filename*=UTF-8''${encodeURIComponent(name)}`;
}

const pointParams = "{vm}/{time}";

export function dataRoutes(daemon: Daemon, options: DataOptions | undefined): Route[] {
  const err = (status: number, what: string): Record<number, [string, string]> => ({
    [status]: [what, "Error"],
  });
  const opts = (): DataOptions => {
    if (!options) throw new StrataError(ErrorCode.INTERNAL, "this API was started without platform adapters");
    return options;
  };
  const catalog = () => daemon.catalog;
  const repoQuery = {
    name: "repository",
    description: "The repository's name in the configuration (default: the one holding the restore point)",
    type: "string" as const,
  };

  /** The configured repository holding vm/time (see the module comment). */
  const repositoryOf = (vm: string, time: string, named: string | null): RepositoryConfig => {
    const repos = daemon.config.repositories;
    if (named !== null) {
      const r = repos.get(named);
      if (!r)
        throw new StrataError(
          ErrorCode.NOT_FOUND,
          `no repository "${named}" (the configuration has ${[...repos.keys()].join(", ")})`,
        );
      return r;
    }
    if (repos.size === 1) return [...repos.values()][0]!;
    const rows = catalog()
      .restorePoints({ vm })
      .filter((p) => time === "latest" || p.time === time);
    const last = rows.at(-1);
    for (const r of repos.values()) if (last && catalog().repositoryAt(r.path) === last.repository) return r;
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `the catalog knows no restore point ${vm}/${time}: name its repository with ?repository=NAME`,
    );
  };

  /** Opens the repository of the point named by the call, read-locked, and finds it. */
  const withPoint = async <T>(
    call: Call,
    what: string,
    fn: (repo: Repository, snap: SnapshotRef, r: RepositoryConfig) => Promise<T>,
  ): Promise<T> => {
    const { vm, time } = call.params as { vm: string; time: string };
    checkName("VM", vm);
    const r = repositoryOf(vm, time, call.query.get("repository"));
    const repo = await openRepository(r, 1);
    try {
      const lock = await repo.lock("read", `${what} of ${vm}/${time} (API)`);
      try {
        const snap = await repo.findSnapshot(`${vm}/${time}`);
        return await fn(repo, snap, r);
      } finally {
        await lock.release();
      }
    } finally {
      await repo.close();
    }
  };

  const selection = (q: URLSearchParams): FsSelection => {
    const fs = q.get("fs");
    const sub = q.get("subvolume");
    return {
      ...(fs === null || fs === "" ? {} : parseSelection(fs)),
      ...(sub === null ? {} : { subvolume: sub }),
    };
  };
  const insidePath = (q: URLSearchParams): string => {
    const p = q.get("path") ?? "/";
    if (!p.startsWith("/") || p.includes("\0") || p.length > 4096)
      throw new StrataError(ErrorCode.USAGE, `path "${p}" must be an absolute path inside the filesystem`);
    return p;
  };
  const fsQuery = [
    {
      name: "fs",
      description: "Which filesystem: DISK, DISK:PART or [DISK:]VG/LV (may be left out when there is one)",
      type: "string" as const,
    },
    {
      name: "subvolume",
      description: "Btrfs: this subvolume instead of the default one",
      type: "string" as const,
    },
  ];
  const instantRecord = (name: string) => {
    checkName("VM", name);
    return loadInstantRecord(name, opts().stateDir, opts().registry);
  };

  return [
    {
      method: "POST",
      path: `/api/v1/restore-points/${pointParams}/restore`,
      action: "restore.start",
      summary:
        "Restore a VM (in place or as a clone), one disk, or an image-file restore point's disks, as a run",
      description:
        "Starts a run (202, with the run: follow it at /api/v1/runs/{id}/events). The body says what: {} restores the whole VM in place (admin only: action restore.in-place; refused while it runs, and over existing files without force); target (a host directory) and name make a clone there (new name, UUID and MACs); disk restores one disk (to its own path (admin only), into target, or onto device); format raw or qcow2; start starts the restored VM. target must resolve (symlinks followed, no '..') inside a directory of the daemon's api.restore-targets and device must match one of api.restore-devices, for every token, admin too; otherwise 403 naming the path and the setting. Options are checked before the run starts (400).",
      query: [repoQuery],
      body: {
        target: {
          type: "string",
          description: "Host directory for a clone or the disks, inside one of api.restore-targets",
        },
        name: { type: "string", description: "The clone's name (with target)" },
        disk: { type: "string", description: "Only this disk" },
        device: {
          type: "string",
          description: "Write disk onto this block device, matching one of api.restore-devices",
        },
        format: { type: "string", enum: ["raw", "qcow2"] },
        force: { type: "boolean", description: "Replace existing files" },
        start: { type: "boolean", description: "Start the restored VM" },
      },
      responses: {
        202: ["The run started", "Run"],
        ...err(400, "Bad options"),
        ...err(
          403,
          "The token's role may not do this, or a path is outside api.restore-targets / api.restore-devices",
        ),
        ...err(404, "No such restore point"),
      },
      handle: async (call) => {
        const b = await readBody(call.req, {
          target: "string",
          name: "string",
          disk: "string",
          device: "string",
          format: "string",
          force: "boolean",
          start: "boolean",
        });
        const o = {
          ...(b.target === undefined ? {} : { target: hostPath(b.target, "target")! }),
          ...(b.name === undefined ? {} : { name: str(b.name)! }),
          ...(b.disk === undefined ? {} : { disk: str(b.disk)! }),
          ...(b.device === undefined ? {} : { device: hostPath(b.device, "device")! }),
          ...(b.format === undefined ? {} : { format: str(b.format) as "raw" | "qcow2" }),
          ...(b.start === true ? { start: true } : {}),
        };
        checkRestoreOptions(o);
        const { vm, time } = call.params as { vm: string; time: string };
        checkName("VM", vm);
        const r = repositoryOf(vm, time, call.query.get("repository"));
        if (o.target === undefined && o.device === undefined && !allows(call.role, "restore.in-place"))
          throw new StrataError(
            ErrorCode.FORBIDDEN,
            `${call.who} may not do restore.in-place: restoring ${vm}${o.disk ? `'s disk ${o.disk}` : ""} over its own disks takes an admin token; give target (or device) to restore beside it`,
          );
        if (o.target !== undefined)
          o.target = await confineDirectory(daemon.config.api, str(b.target)!, "target");
        if (o.device !== undefined)
          o.device = await confineDevice(daemon.config.api, str(b.device)!, "device");
        const run = daemon.startTask(
          {
            kind: "restore",
            vm,
            repository: r.name,
            work: async (ctx) => {
              const repo = await openRepository(r);
              try {
                const lock = await repo.lock("read", `restore of ${vm}/${time} (API run ${ctx.runId})`);
                try {
                  const snap = await repo.findSnapshot(`${vm}/${time}`);
                  ctx.log(
                    "info",
                    `restore of ${snap.vm}/${snap.time} from ${r.name}${o.target ? ` to ${o.target}` : ""}${o.disk ? `, disk ${o.disk}` : ""}`,
                  );
                  const res = await restorePoint(repo, snap, opts().registry, {
                    ...o,
                    force: b.force === true,
                    progress: ctx.progress,
                    signal: ctx.signal,
                    warn: (m) => ctx.log("warn", m),
                  });
                  for (const d of res.disks) ctx.log("info", `${d.disk}: ${d.path} (${d.size} bytes)`);
                  if (res.plan?.definition.file) ctx.log("info", `defined in ${res.plan.definition.file}`);
                  if (res.started) ctx.log("info", `started: ${res.started.where}`);
                  const size = res.disks.reduce((n, d) => n + d.size, 0);
                  const written = res.disks.reduce((n, d) => n + d.bytesWritten, 0);
                  return { bytesRead: size, bytesNew: written, restorePoint: res.id };
                } finally {
                  await lock.release();
                }
              } finally {
                await repo.close();
              }
            },
          },
          call.who,
        );
        return [202, run];
      },
    },
    {
      method: "GET",
      path: `/api/v1/restore-points/${pointParams}/config`,
      action: "files.read",
      contentType: "text/plain",
      summary: "The VM's configuration stored in a restore point, as a download",
      description:
        "The definition as the platform writes it: as=json (Strata's, default), qemu-args, xml (libvirt) or pve; with target and name, for a clone. A configuration may hold secrets (passwords on a command line), so it is data: read tokens may not fetch it.",
      query: [
        repoQuery,
        { name: "as", description: "json (default), qemu-args, xml or pve", type: "string" },
        { name: "target", description: "For a clone: its host directory", type: "string" },
        { name: "name", description: "For a clone: its name", type: "string" },
      ],
      responses: {
        200: ["The definition", { type: "string" }],
        ...err(400, "No VM configuration in this restore point, or a bad option"),
        ...err(404, "No such restore point"),
      },
      handle: (call) =>
        withPoint(call, "configuration", async (repo, snap) => {
          const stored = await readVmConfig(repo, snap, opts().registry);
          if (!stored)
            throw new StrataError(
              ErrorCode.USAGE,
              `restore point ${snap.vm}/${snap.time} was taken from image files and carries no VM configuration`,
            );
          const target = hostPath(call.query.get("target") ?? undefined, "target");
          const name = call.query.get("name") ?? undefined;
          if (name !== undefined) {
            if (target === undefined)
              throw new StrataError(ErrorCode.USAGE, "name names a clone: give its directory as target");
            checkName("clone", name);
          }
          const plan = await planVmRestore(stored, snap, {
            ...(target === undefined ? {} : { target }),
            ...(name === undefined ? {} : { name }),
          });
          const as = call.query.get("as") ?? "json";
          const text = renderVmConfig(stored, plan, as);
          const ext = as === "json" ? "json" : as === "xml" ? "xml" : as === "pve" ? "conf" : "txt";
          call.res.writeHead(200, {
            "Content-Type": `${as === "json" ? "application/json" : as === "xml" ? "application/xml" : "text/plain"}; charset=utf-8`,
            "Content-Length": Buffer.byteLength(text),
            "Content-Disposition": attachment(`${plan.config.name ?? snap.vm}.${ext}`),
            "Cache-Control": "no-store",
          });
          call.res.end(text);
          return undefined;
        }),
    },
    {
      method: "GET",
      path: `/api/v1/restore-points/${pointParams}/layout`,
      action: "files.read",
      summary: "The partitions, filesystems and LVM volumes of a restore point's disks",
      query: [repoQuery, { name: "disk", description: "Only this disk", type: "string" }],
      responses: { 200: ["Disks and volume groups", "Layout"], ...err(404, "No such restore point or disk") },
      handle: (call) =>
        withPoint(call, "files layout", async (repo, snap) => {
          const layout = await restorePointLayout(
            repo,
            snap,
            call.query.get("disk") ?? undefined,
            { cacheBytes: FILES_CACHE_BYTES },
            clientGone(call),
          );
          return [200, { id: `${snap.vm}/${snap.time}`, ...layout }];
        }),
    },
    {
      method: "GET",
      path: `/api/v1/restore-points/${pointParams}/files`,
      action: "files.read",
      summary: "A directory inside a restore point's filesystem, a page at a time",
      description:
        "Entries with kind, size, mode, owner, mtime (ms) and symlink target, sorted by name. A path naming a file lists that file alone.",
      query: [
        repoQuery,
        ...fsQuery,
        { name: "path", description: "Absolute path inside the filesystem (default /)", type: "string" },
        { name: "limit", description: "At most this many (default 200, at most 1000)", type: "integer" },
        { name: "offset", description: "Skip this many (default 0)", type: "integer" },
      ],
      responses: {
        200: ["One page", "FilePage"],
        ...err(400, "Ambiguous or bad filesystem selection"),
        ...err(404, "No such restore point or path"),
      },
      handle: async (call) => {
        const sel = selection(call.query);
        const path = insidePath(call.query);
        const limit = pageInt(call.query, "limit", 200, 1000);
        const offset = pageInt(call.query, "offset", 0, Number.MAX_SAFE_INTEGER);
        return withPoint(call, "files ls", async (repo, snap) => {
          const signal = clientGone(call);
          const browser = await FileBrowser.open(repo, snap, sel, { cacheBytes: FILES_CACHE_BYTES, signal });
          try {
            const all = (await browser.list(path, signal)).sort((a, b) =>
              a.name < b.name ? -1 : a.name > b.name ? 1 : 0,
            );
            const entries = all.slice(offset, offset + limit);
            return [
              200,
              {
                id: `${snap.vm}/${snap.time}`,
                disk: browser.disk,
                partition: browser.partition?.number ?? null,
                volume: browser.volume ?? null,
                filesystem: browser.fs.type,
                path,
                total: all.length,
                offset,
                limit,
                nextOffset: offset + entries.length < all.length ? offset + entries.length : null,
                entries,
              },
            ];
          } finally {
            await browser.close();
          }
        });
      },
    },
    {
      method: "GET",
      path: `/api/v1/restore-points/${pointParams}/download`,
      action: "files.read",
      contentType: "application/octet-stream",
      summary: "Download a file (its bytes) or a folder (a tar) from inside a restore point",
      description:
        "A regular file streams as application/octet-stream with its size; a directory (or a symlink) as a pax tar (application/x-tar) of everything under it, named by its last name, as strata files get --tar writes it. Every chunk is verified: a damaged one cuts the stream short (the client sees an incomplete body).",
      query: [
        repoQuery,
        ...fsQuery,
        { name: "path", description: "Absolute path inside the filesystem", type: "string" },
      ],
      responses: {
        200: ["The file or the tar", { type: "string", format: "binary" }],
        ...err(404, "No such restore point or path"),
      },
      handle: async (call) => {
        const sel = selection(call.query);
        const path = insidePath(call.query);
        return withPoint(call, "download", async (repo, snap) => {
          const signal = clientGone(call);
          const browser = await FileBrowser.open(repo, snap, sel, { cacheBytes: FILES_CACHE_BYTES, signal });
          try {
            const entry = await browser.stat(path);
            const base = entry.name === "" ? snap.vm : entry.name;
            if (entry.kind === "file") {
              call.res.writeHead(200, {
                "Content-Type": "application/octet-stream",
                "Content-Length": entry.size,
                "Content-Disposition": attachment(base),
                "Cache-Control": "no-store",
              });
              await streamFile(browser, entry, call.res, signal);
            } else {
              call.res.writeHead(200, {
                "Content-Type": "application/x-tar",
                "Content-Disposition": attachment(`${base}.tar`),
                "Cache-Control": "no-store",
              });
              await tarFiles(browser, [path], call.res, { signal });
            }
            call.res.end();
            return undefined;
          } finally {
            await browser.close();
          }
        });
      },
    },
    {
      method: "DELETE",
      path: `/api/v1/restore-points/${pointParams}`,
      action: "forget.run",
      summary:
        "Forget a restore point (gc frees its space); one under S3 Object Lock retention is kept and listed in locked",
      query: [repoQuery],
      responses: { 200: ["Removed", "Forgotten"], ...err(404, "No such restore point") },
      handle: async (call) => {
        const { vm, time } = call.params as { vm: string; time: string };
        checkName("VM", vm);
        const r = repositoryOf(vm, time, call.query.get("repository"));
        const repo = await openRepository(r, 1);
        try {
          // A restore point under S3 Object Lock retention is kept and listed in `locked`.
          const { removed, locked } = await forgetIds(repo, [`${vm}/${time}`]);
          await rebuildRestorePoints(catalog(), repo);
          return [200, { repository: r.name, removed, locked }];
        } finally {
          await repo.close();
        }
      },
    },
    {
      method: "POST",
      path: "/api/v1/repositories/{name}/gc",
      action: "gc.run",
      summary: "Remove what no restore point uses, as a run",
      description:
        "Starts a run (202) of strata gc on the repository; graceSeconds (default 3600) keeps what backups may still rely on.",
      body: { graceSeconds: { type: "integer", description: "Default 3600" } },
      responses: { 202: ["The run started", "Run"], ...err(404, "No such repository") },
      handle: async (call) => {
        const b = await readBody(call.req, { graceSeconds: "number" });
        const grace = b.graceSeconds === undefined ? 3600 : (b.graceSeconds as number);
        if (!Number.isSafeInteger(grace) || grace < 0)
          throw new StrataError(
            ErrorCode.USAGE,
            `graceSeconds must be a whole number of seconds, not ${grace}`,
          );
        const r = repositoryOf("", "", call.params.name!);
        const run = daemon.startTask(
          {
            kind: "gc",
            vm: "",
            repository: r.name,
            work: async (ctx) => {
              const repo = await openRepository(r);
              try {
                const report = await gc(repo, {
                  graceMs: grace * 1000,
                  progress: ctx.progress,
                  signal: ctx.signal,
                });
                ctx.log(
                  "info",
                  report.packsCondemned === undefined
                    ? `gc removed ${report.chunksRemoved} chunks (${report.bytesFreed} bytes freed); ${report.chunksReferenced} in use`
                    : `gc deleted ${report.packsDeleted} pack(s) (${report.bytesFreed} bytes freed), condemned ${report.packsCondemned} (deleted by a later gc), repacked ${report.packsRepacked}; ${report.chunksReferenced} chunks in use`,
                );
                await rebuildRestorePoints(catalog(), repo);
                return {};
              } finally {
                await repo.close();
              }
            },
          },
          call.who,
        );
        return [202, run];
      },
    },
    {
      method: "POST",
      path: `/api/v1/restore-points/${pointParams}/instant`,
      action: "instant.manage",
      summary: "Boot the VM straight from a restore point (instant recovery)",
      description:
        "The VM runs on local overlays over the restore point, served by a detached strata serve; name (default: the VM's) makes it a clone with a new UUID and MACs; target is the directory of its overlays (default: the state dir's instant/NAME), inside one of the daemon's api.restore-targets (else 403). Answers 201 with its state once it runs.",
      query: [repoQuery],
      body: {
        name: { type: "string", description: "Run as a clone with this name" },
        target: {
          type: "string",
          description: "Host directory for overlays and run files, inside one of api.restore-targets",
        },
      },
      responses: {
        201: ["It runs", "Instant"],
        ...err(403, "The token's role may not do this, or a path is outside api.restore-targets"),
        ...err(404, "No such restore point"),
        ...err(409, "A VM of that name is recorded"),
      },
      handle: async (call) => {
        const b = await readBody(call.req, { name: "string", target: "string" });
        const name = str(b.name);
        if (name !== undefined) checkName("VM", name);
        const target =
          b.target === undefined
            ? undefined
            : await confineDirectory(daemon.config.api, str(b.target)!, "target");
        return withPoint(call, "instant recovery", async (repo, snap, r) => {
          const o = opts();
          const stored = await readVmConfig(repo, snap, o.registry);
          if (!stored)
            throw new StrataError(
              ErrorCode.USAGE,
              `${snap.vm}/${snap.time} holds no VM configuration (a file: backup): nothing to boot`,
            );
          const as = name ?? snap.vm;
          checkName("VM", as);
          const id = `${snap.vm}/${snap.time}`;
          const warnings: string[] = [];
          const started = await startInstant(snap, stored, o.registry, {
            dir: target ?? join(instantStateDir(o.stateDir), as),
            name: as,
            clone: name !== undefined,
            repo: r.path,
            ...(r.passwordFile === undefined ? {} : { passwordFile: r.passwordFile }),
            serveCommand: serveCommandLine(o.strataCommand, id, {
              repoArgs: repoArgs(r),
              cacheSize: "256M",
            }),
            stateDir: o.stateDir,
            log: (m) => warnings.push(m),
          });
          const s = await describeInstant(started.record, o.registry);
          return [201, { ...s, warnings: [...warnings, ...s.warnings], startMs: started.startMs }];
        });
      },
    },
    {
      method: "GET",
      path: "/api/v1/instant",
      action: "instant.list",
      summary: "Instantly recovered VMs: what runs, where, how far migrated",
      responses: { 200: ["The VMs", { type: "array", items: { $ref: "#/components/schemas/Instant" } }] },
      handle: async () => {
        const o = opts();
        const { records } = await listInstantRecords(o.stateDir, o.registry);
        return [200, await Promise.all(records.map((r) => describeInstant(r, o.registry)))];
      },
    },
    {
      method: "GET",
      path: "/api/v1/instant/{name}",
      action: "instant.list",
      summary: "One instantly recovered VM",
      responses: { 200: ["Its state", "Instant"], ...err(404, "No such instantly recovered VM") },
      handle: async (call) => [
        200,
        await describeInstant(await instantRecord(call.params.name!), opts().registry),
      ],
    },
    {
      method: "POST",
      path: "/api/v1/instant/{name}/migrate",
      action: "instant.manage",
      summary: "Move an instantly recovered VM's disks to production storage, live, as a run",
      description:
        "Starts a run (202): every disk is mirrored to target (a host directory inside one of the daemon's api.restore-targets, else 403) as format (qcow2 default, or raw) while the guest runs, at most limitMiBps MiB/s; active mirrors every guest write synchronously so the copy converges under any write load. Then the server stops and the overlays go.",
      body: {
        target: {
          type: "string",
          description: "Host directory for the disks, inside one of api.restore-targets",
        },
        format: { type: "string", enum: ["qcow2", "raw"] },
        limitMiBps: { type: "number", description: "Copy at most this fast" },
        active: { type: "boolean" },
      },
      responses: {
        202: ["The run started", "Run"],
        ...err(400, "Bad options"),
        ...err(403, "The token's role may not do this, or a path is outside api.restore-targets"),
        ...err(404, "No such instantly recovered VM"),
      },
      handle: async (call) => {
        const b = await readBody(call.req, {
          target: "string",
          format: "string",
          limitMiBps: "number",
          active: "boolean",
        });
        if (b.target === undefined)
          throw new StrataError(ErrorCode.USAGE, 'give "target": the directory the disks go to');
        hostPath(b.target, "target");
        const format = str(b.format) ?? "qcow2";
        if (format !== "qcow2" && format !== "raw")
          throw new StrataError(ErrorCode.USAGE, `format ${format}: migrate writes qcow2 or raw`);
        const limit = b.limitMiBps as number | undefined;
        if (limit !== undefined && (!Number.isFinite(limit) || limit <= 0))
          throw new StrataError(ErrorCode.USAGE, `limitMiBps takes MiB/s above 0, not ${limit}`);
        const record = await instantRecord(call.params.name!);
        const target = await confineDirectory(daemon.config.api, str(b.target)!, "target");
        const repository =
          [...daemon.config.repositories.values()].find((r) => resolve(r.path) === resolve(record.repo))
            ?.name ?? record.repo;
        const run = daemon.startTask(
          {
            kind: "instant",
            vm: record.name,
            repository,
            work: async (ctx) => {
              const o = opts();
              ctx.log(
                "info",
                `migration of ${record.name} to ${target} (${format}${limit === undefined ? "" : `, at most ${limit} MiB/s`})`,
              );
              const disks = await migrateInstant(
                record.name,
                {
                  target,
                  format,
                  ...(limit === undefined ? {} : { limitBytes: Math.round(limit * 1024 * 1024) }),
                  active: b.active === true,
                  stateDir: o.stateDir,
                  progress: ctx.progress,
                  signal: ctx.signal,
                  log: (m) => ctx.log("warn", m),
                },
                o.registry,
              );
              for (const d of disks)
                ctx.log("info", `${d.disk}: ${d.path}${d.skipped ? " (already there)" : ""}`);
              return { bytesRead: disks.reduce((n, d) => n + d.size, 0) };
            },
          },
          call.who,
        );
        return [202, run];
      },
    },
    {
      method: "POST",
      path: "/api/v1/instant/{name}/stop",
      action: "instant.manage",
      summary: "Stop an instantly recovered VM and its server",
      body: {
        discard: { type: "boolean", description: "Also remove the overlays and the record" },
        powerdownSeconds: { type: "integer", description: "Ask the guest to power down first, this long" },
      },
      responses: { 200: ["Stopped", "InstantStopped"], ...err(404, "No such instantly recovered VM") },
      handle: async (call) => {
        const b = await readBody(call.req, { discard: "boolean", powerdownSeconds: "number" });
        const p = (b.powerdownSeconds as number | undefined) ?? 0;
        if (!Number.isSafeInteger(p) || p < 0 || p > 3600)
          throw new StrataError(
            ErrorCode.USAGE,
            `powerdownSeconds must be a whole number up to 3600, not ${p}`,
          );
        const name = call.params.name!;
        checkName("VM", name);
        const o = opts();
        const r = await stopInstant(
          name,
          { discard: b.discard === true, powerdownMs: p * 1000, stateDir: o.stateDir },
          o.registry,
        );
        return [200, { name, vm: r.vm, discarded: r.discarded }];
      },
    },
  ];
}

function pageInt(q: URLSearchParams, name: string, dflt: number, max: number): number {
  const v = q.get(name);
  if (v === null) return dflt;
  const n = Number(v);
  if (!/^\d{1,15}$/.test(v) || !Number.isSafeInteger(n) || n > max)
    throw new StrataError(
      ErrorCode.USAGE,
      `query parameter ${name} must be a whole number up to ${max}, not "${v}"`,
    );
  return n;
}
