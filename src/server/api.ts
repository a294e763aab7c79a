/**
 * The REST API: JSON over HTTP, version 1 under /api/v1, described by the OpenAPI 3 document it
 * serves at /api/v1/openapi.json (made from the same route table that dispatches, so the two
 * can't drift apart).
 *
 * Transports (src/server/listen.ts): plain HTTP on an owner-only unix socket, and HTTPS on a TCP
 * port when configured. Every call but the OpenAPI document needs a token, `Authorization:
 * Bearer strata_<id>_<secret>` (src/catalog/tokens.ts), whose role must allow the route's
 * action (src/catalog/roles.ts). One exception: a call on the unix socket without an
 * Authorization header acts as the local administrator, as the socket (mode 0600, owned by the
 * daemon's user) admits only processes that could read the catalog anyway; that is how
 * `strata jobs` and `strata run` on the host talk to the daemon. A call with a header is
 * checked on either transport.
 *
 * Refusals: 401 when the token is missing, malformed, unknown, wrong, revoked or expired; 403
 * when its role may not do the action. Each refusal is logged with the method, path, transport,
 * peer, the token's id (never its secret) and the reason.
 *
 * Errors are `{"error": {"code", "message"}}` with the StrataError's stable code; the status
 * follows the code (USAGE 400, UNAUTHORIZED 401, FORBIDDEN 403, NOT_FOUND 404, conflicts 409).
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Catalog, Job, RestorePointRow, Run } from "../catalog/catalog.js";
import { ACTIONS, type Action, allows } from "../catalog/roles.js";
import type { Role } from "../catalog/schema.js";
import { type TokenInfo, verifyToken } from "../catalog/tokens.js";
import { cdpWindow } from "../engine/cdp-status.js";
import { manifestTotals } from "../repo/manifest.js";
import { forget } from "../repo/prune.js";
import { type Clock, systemClock } from "../util/clock.js";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import { type DataOptions, dataRoutes } from "./api-data.js";
import type { Policy } from "./config.js";

export { rpoOf } from "./rpo.js";

import type { CdpState } from "./cdp.js";
import { rpoOf, rpoStateOf } from "./rpo.js";
import { openRepository } from "./runner.js";
import type { Daemon, DaemonLog, RunEvent } from "./service.js";
import { StaticFiles } from "./static.js";

export type Transport = "unix" | "https";

interface Call {
  req: IncomingMessage;
  res: ServerResponse;
  params: Record<string, string>;
  query: URLSearchParams;
  who: string;
  /** The caller's token; undefined for the unix socket's local administrator. */
  token?: TokenInfo;
  /** The token's role; admin for the unix socket's local administrator. */
  role: Role;
}

/** A VM's continuous data protection as the API shows it. */
interface CdpView {
  state: CdpState;
  policy: string;
  journal: string | null;
  pid: number | null;
  starts: number;
  lastExit: string | null;
  from: string | null;
  to: string | null;
  journalBytes: number;
  lagMs: number | null;
  /** When protection was down (a protect died, a later one resumed); `to` null while resuming. */
  gaps: Array<{ from: string; to: string | null }>;
  marks: Array<{ name: string; time: string }>;
}

/** One route: what it does, who may, how it is described, and its handler. */
export interface Route {
  method: "GET" | "POST" | "DELETE";
  path: string;
  /** The action a token's role must allow; a function when it depends on the target. */
  action: Action | ((params: Record<string, string>) => Action) | null;
  summary: string;
  description?: string;
  query?: Array<{ name: string; description: string; type: "integer" | "string" }>;
  /** The JSON body's fields (all optional), as OpenAPI schemas. */
  body?: Record<string, Record<string, unknown>>;
  /** Status → [description, schema name in components (or inline schema)]. */
  responses: Record<number, [string, string | Record<string, unknown>]>;
  /** The 200 answer's media type when it is not JSON. */
  contentType?: string;
  /** Writes the response itself when it returns undefined (server-sent events, metrics). */
  handle(call: Call): Promise<[number, unknown] | undefined> | [number, unknown] | undefined;
}

const STATUS: Partial<Record<string, number>> = {
  [ErrorCode.USAGE]: 400,
  [ErrorCode.UNAUTHORIZED]: 401,
  [ErrorCode.FORBIDDEN]: 403,
  [ErrorCode.NOT_FOUND]: 404,
  [ErrorCode.REPO_NOT_FOUND]: 404,
  [ErrorCode.LOCKED]: 409,
  [ErrorCode.TARGET_CONFLICT]: 409,
  [ErrorCode.ABORTED]: 503,
};

export interface ApiOptions {
  daemon: Daemon;
  clock?: Clock;
  log?: DaemonLog;
  /** Heartbeat comment interval of event streams (default 15 s), so proxies keep them open. */
  heartbeatMs?: number;
  /** The web UI's built files, served at `/` (default dist/web; see static.ts). */
  webRoot?: string;
  /** Adapters, state dir and how to run strata: what restores, files and instant recovery need. */
  data?: DataOptions;
}

function intParam(v: string | undefined, what: string): number {
  const n = Number(v);
  if (v === undefined || !/^\d{1,15}$/.test(v) || !Number.isSafeInteger(n))
    throw new StrataError(ErrorCode.USAGE, `${what} must be a whole number, not "${v ?? ""}"`);
  return n;
}

function queryInt(q: URLSearchParams, name: string, dflt: number, max: number): number {
  const v = q.get(name);
  if (v === null) return dflt;
  const n = intParam(v, `query parameter ${name}`);
  if (n > max) throw new StrataError(ErrorCode.USAGE, `query parameter ${name} must be at most ${max}`);
  return n;
}

export class Api {
  private readonly clock: Clock;
  private readonly log: DaemonLog;
  readonly routes: Route[];
  private readonly web: StaticFiles;
  private readonly compiled: Array<{ route: Route; re: RegExp; names: string[] }>;

  constructor(private readonly o: ApiOptions) {
    this.clock = o.clock ?? systemClock;
    this.log = o.log ?? (() => {});
    this.routes = this.makeRoutes();
    this.web = new StaticFiles(o.webRoot);
    this.compiled = this.routes.map((route) => {
      const names: string[] = [];
      const re = new RegExp(
        `^${route.path.replace(/\{(\w+)\}/g, (_, n: string) => {
          names.push(n);
          return "([^/]+)";
        })}$`,
      );
      return { route, re, names };
    });
  }

  private get catalog(): Catalog {
    return this.o.daemon.catalog;
  }

  /** The request handler for both transports. */
  handler(transport: Transport): (req: IncomingMessage, res: ServerResponse) => void {
    return (req, res) => {
      this.serve(req, res, transport).catch((err) => {
        this.log("error", `api: ${req.method} ${req.url}: ${describeError(err)}`);
        if (!res.headersSent) this.send(res, 500, errorBody(ErrorCode.INTERNAL, describeError(err)));
        else res.destroy();
      });
    };
  }

  private async serve(req: IncomingMessage, res: ServerResponse, transport: Transport): Promise<void> {
    const url = new URL(req.url ?? "/", "http://strata");
    const path = url.pathname.replace(/\/+$/, "") || "/";
    if (!path.startsWith("/api/") && path !== "/metrics" && this.web.serve(req, res, url.pathname)) return;
    await this.o.daemon.ready;
    let found: { route: Route; params: Record<string, string> } | undefined;
    let pathKnown = false;
    for (const c of this.compiled) {
      const m = c.re.exec(path);
      if (!m) continue;
      pathKnown = true;
      if (c.route.method !== req.method) continue;
      const params: Record<string, string> = {};
      for (const [i, n] of c.names.entries()) {
        try {
          params[n] = decodeURIComponent(m[i + 1]!);
        } catch {
          return this.send(
            res,
            400,
            errorBody(ErrorCode.USAGE, `${path}: {${n}} is not valid percent-encoding`),
          );
        }
      }
      found = { route: c.route, params };
      break;
    }
    if (!found) {
      if (pathKnown)
        return this.send(res, 405, errorBody(ErrorCode.USAGE, `${req.method} is not allowed on ${path}`));
      return this.send(
        res,
        404,
        errorBody(ErrorCode.NOT_FOUND, `no route ${req.method} ${path} (see /api/v1/openapi.json)`),
      );
    }
    const { route, params } = found;
    const peer =
      transport === "unix" ? "unix socket" : `${req.socket.remoteAddress}:${req.socket.remotePort}`;
    let who = "local administrator (unix socket)";
    let token: TokenInfo | undefined;
    let role: Role = "admin";
    try {
      if (route.action !== null) {
        token = this.authenticate(req, transport);
        const action = typeof route.action === "function" ? route.action(params) : route.action;
        if (token) {
          who = `token ${token.id} (${token.name}, role ${token.role})`;
          role = token.role;
          if (!allows(token.role, action))
            throw new StrataError(ErrorCode.FORBIDDEN, `${who} may not do ${action}`);
        }
      }
      const out = await route.handle({
        req,
        res,
        params,
        query: url.searchParams,
        who,
        role,
        ...(token === undefined ? {} : { token }),
      });
      if (out) this.send(res, out[0], out[1]);
    } catch (err) {
      const code = err instanceof StrataError ? err.code : ErrorCode.INTERNAL;
      const status = STATUS[code] ?? 500;
      if (status === 401 || status === 403)
        this.log("warn", `api: refused ${req.method} ${path} from ${peer}: ${status} ${describeError(err)}`);
      else if (status >= 500) this.log("error", `api: ${req.method} ${path}: ${describeError(err)}`);
      if (res.headersSent) {
        res.destroy();
        return;
      }
      if (status === 401) res.setHeader("WWW-Authenticate", 'Bearer realm="strata"');
      this.send(res, status, errorBody(code, describeError(err)));
    }
  }

  /** The caller's token; undefined for the unix socket's local administrator (no header). */
  private authenticate(req: IncomingMessage, transport: Transport): TokenInfo | undefined {
    const header = req.headers.authorization;
    if (header === undefined) {
      if (transport === "unix") return undefined;
      throw new StrataError(
        ErrorCode.UNAUTHORIZED,
        "no API token: send Authorization: Bearer strata_<id>_<secret> (strata token create)",
      );
    }
    const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (!m)
      throw new StrataError(
        ErrorCode.UNAUTHORIZED,
        "the Authorization header is not of the form: Bearer strata_<id>_<secret>",
      );
    return verifyToken(this.catalog, m[1]!, this.clock);
  }

  private send(res: ServerResponse, status: number, body: unknown): void {
    const text = `${JSON.stringify(body, null, 2)}\n`;
    res.writeHead(status, {
      "Content-Type": "application/json; charset=utf-8",
      "Content-Length": Buffer.byteLength(text),
      "Cache-Control": "no-store",
    });
    res.end(text);
  }

  // ---- what the routes answer ----

  private jobView(job: Job, runs = 5) {
    const d = this.o.daemon;
    const next = d.nextDue(job.id);
    return {
      ...job,
      nextDue: next === undefined ? null : new Date(next).toISOString(),
      running: d.running().find((r) => r.jobId === job.id) ?? null,
      queued: d.queued().some((q) => q.id === job.id),
      runs: this.catalog.runs(job.id, runs),
    };
  }

  private repoId(name: string): string | undefined {
    const r = this.o.daemon.config.repositories.get(name);
    return r && this.catalog.repositoryAt(r.path);
  }

  /**
   * What {@link vmView} reads, asked once for a whole list: the VMs known, the backup jobs by
   * VM, each repository's newest restore point per VM, and each policy's RPO now.
   */
  private vmContext() {
    const d = this.o.daemon;
    const now = this.clock.now();
    const known = new Map(d.knownVms().map((v) => [v.name, v]));
    const entries = new Map<string, ReturnType<Daemon["entries"]>>();
    for (const e of d.entries())
      if (e.job.kind === "backup") entries.set(e.job.vm, [...(entries.get(e.job.vm) ?? []), e]);
    const newest = new Map<string, Map<string, RestorePointRow>>();
    const newestOf = (repository: string, vm: string) => {
      if (!newest.has(repository)) {
        const id = this.repoId(repository);
        newest.set(repository, id === undefined ? new Map() : this.catalog.newestRestorePoints(id));
      }
      return newest.get(repository)!.get(vm);
    };
    const rpos = new Map<string, number | undefined>();
    const rpo = (p: Policy) => {
      if (!rpos.has(p.name)) rpos.set(p.name, rpoOf(p, now));
      return rpos.get(p.name);
    };
    return { now, known, entries, newestOf, rpo };
  }

  private vmView(name: string, ctx = this.vmContext()) {
    const { now } = ctx;
    const vm = ctx.known.get(name);
    const protection = (ctx.entries.get(name) ?? []).map((e) => {
      const { rpoMs, last, ageMs, met } = rpoStateOf(
        ctx.rpo(e.policy),
        ctx.newestOf(e.job.repository, name),
        now,
      );
      return {
        policy: e.policy.name,
        repository: e.job.repository,
        jobId: e.job.id,
        schedule: e.policy.schedule.text,
        lastRestorePoint: last ? pointView(last) : null,
        ageMs,
        rpoMs: rpoMs ?? null,
        rpoMet: met,
        lastRun: this.catalog.lastRun(e.job.id) ?? null,
      };
    });
    return {
      name,
      adapter: vm?.adapter ?? null,
      state: vm?.state ?? "unknown",
      tags: vm?.tags ?? [],
      sources: vm?.sources ?? [],
      protected: protection.length > 0 && protection.every((p) => p.rpoMet),
      policies: protection,
    };
  }

  /**
   * The continuous data protection of each VM the daemon protects among `names`: its protect's
   * state (src/server/cdp.ts) and the window its journal holds (src/engine/cdp-status.ts); null
   * for the others. One repository opening per repository (it gives the journals their keys).
   */
  private async cdpViews(names: readonly string[]): Promise<Map<string, CdpView | null>> {
    const d = this.o.daemon;
    const out = new Map<string, CdpView | null>(names.map((n) => [n, null]));
    const byRepo = new Map<string, NonNullable<ReturnType<Daemon["cdpStatus"]>>[]>();
    for (const n of names) {
      const s = d.cdpStatus(n);
      if (s) byRepo.set(s.repository, [...(byRepo.get(s.repository) ?? []), s]);
    }
    for (const [name, statuses] of byRepo) {
      const r = d.config.repositories.get(name);
      const repo = r && (await openRepository(r, 1).catch(() => undefined));
      try {
        for (const s of statuses) {
          const base: CdpView = {
            state: s.state,
            policy: s.policy,
            journal: s.journal ?? null,
            pid: s.pid ?? null,
            starts: s.starts,
            lastExit: s.lastExit ?? null,
            from: null,
            to: null,
            journalBytes: 0,
            lagMs: null,
            gaps: [],
            marks: [],
          };
          if (repo && s.journal !== undefined) {
            const w = await cdpWindow(repo, s.journal, s.vm).catch(() => undefined);
            if (w) {
              base.from = w.from;
              base.to = w.to;
              base.journalBytes = w.journalBytes;
              base.lagMs = w.lagMs ?? null;
              base.gaps = w.gaps;
              base.marks = w.marks.map((m) => ({ name: m.name, time: m.at }));
            }
          }
          out.set(s.vm, base);
        }
      } finally {
        await repo?.close();
      }
    }
    return out;
  }

  private repositoryOf(name: string) {
    const r = this.o.daemon.config.repositories.get(name);
    if (!r)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `no repository "${name}" (the configuration has ${[...this.o.daemon.config.repositories.keys()].join(", ")})`,
      );
    return r;
  }

  private runOf(params: Record<string, string>): Run {
    const id = intParam(params.id, "run id");
    const run = this.catalog.run(id);
    if (!run) throw new StrataError(ErrorCode.NOT_FOUND, `no run ${id}`);
    return run;
  }

  private jobOf(params: Record<string, string>): Job {
    const id = intParam(params.id, "job id");
    const job = this.catalog.job(id);
    if (!job) throw new StrataError(ErrorCode.NOT_FOUND, `no job ${id}`);
    return job;
  }

  private policyOf(params: Record<string, string>): Policy {
    const p = this.o.daemon.config.policies.get(params.name!);
    if (!p)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `no policy "${params.name}" (the configuration has ${[...this.o.daemon.config.policies.keys()].join(", ")})`,
      );
    return p;
  }

  /** Server-sent events of a run: its log so far, then live progress and log, then its end. */
  private events(call: Call): undefined {
    const run = this.runOf(call.params);
    const { res } = call;
    res.writeHead(200, {
      "Content-Type": "text/event-stream; charset=utf-8",
      "Cache-Control": "no-store",
      Connection: "keep-alive",
      "X-Accel-Buffering": "no",
    });
    const write = (e: RunEvent) => res.write(`event: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`);
    let sub: ReturnType<Daemon["subscribe"]>;
    const live: RunEvent[] = [];
    let replaying = true;
    let ended = false;
    const finish = () => {
      if (ended) return;
      ended = true;
      clearInterval(beat);
      sub?.unsubscribe();
      res.end();
    };
    const onEvent = (e: RunEvent) => {
      if (replaying) {
        live.push(e);
        return;
      }
      write(e);
      if (e.type === "end") finish();
    };
    // Subscribe first, so nothing said between the replay and the subscription is lost.
    sub = this.o.daemon.subscribe(run.id, onEvent);
    const beat = setInterval(() => res.write(": keep-alive\n\n"), this.o.heartbeatMs ?? 15_000);
    res.on("close", finish); // the client went away
    for (const l of this.catalog.logs(run.id))
      write({ type: "log", time: l.time, level: l.level, message: l.message });
    if (sub) write({ type: "progress", ...sub.progress });
    replaying = false;
    for (const e of live.splice(0)) {
      if (e.type !== "log") write(e);
      if (e.type === "end") {
        finish();
        return undefined;
      }
    }
    if (!sub) {
      write({ type: "end", run: this.catalog.run(run.id)! });
      finish();
    }
    return undefined;
  }

  private makeRoutes(): Route[] {
    const d = this.o.daemon;
    const err = (status: number, what: string): Record<number, [string, string]> => ({
      [status]: [what, "Error"],
    });
    return [
      {
        method: "GET",
        path: "/api/v1/openapi.json",
        action: null,
        summary: "This document",
        responses: { 200: ["The OpenAPI 3 document of this API", { type: "object" }] },
        handle: () => [200, this.openapi()],
      },
      {
        method: "GET",
        path: "/api/v1/whoami",
        // Every role may list jobs: this asks only that the token is good.
        action: "jobs.list",
        summary: "The caller's token, role and the actions that role may do",
        description:
          "What a client (the web UI) shows and hides: the token's id, name and role, and every action of src/catalog/roles.ts the role allows. The unix socket's local administrator has no token and every action.",
        responses: { 200: ["The caller", "Whoami"] },
        handle: ({ token }) => {
          const role = token?.role ?? "admin";
          return [
            200,
            {
              token: token ? { id: token.id, name: token.name, expiresAt: token.expiresAt } : null,
              role,
              actions: ACTIONS.filter((a) => allows(role, a)),
            },
          ];
        },
      },
      {
        method: "GET",
        path: "/api/v1/repositories",
        action: "repo.stats",
        summary: "The configured repositories",
        responses: {
          200: [
            "Name, location and the catalog's figures of each",
            { type: "array", items: { $ref: "#/components/schemas/Repository" } },
          ],
        },
        handle: () => {
          const out = [];
          for (const r of d.config.repositories.values()) {
            const id = this.repoId(r.name);
            const points = id === undefined ? [] : this.catalog.restorePoints({ repository: id });
            out.push({
              name: r.name,
              location: r.path,
              restorePoints: points.length,
              storedBytes: points.reduce((n, p) => n + p.bytesStored, 0),
            });
          }
          return [200, out];
        },
      },
      {
        method: "GET",
        path: "/api/v1/repositories/{name}/history",
        action: "repo.stats",
        summary: "A repository's usage over time, one sample per day, from the catalog",
        description:
          "Per UTC day that has restore points, the figures of the restore points the repository holds now that were made up to that day's end: logical bytes (their disks' sizes), stored bytes (what each added to the repository, compressed), the ratio of the two, and the stored bytes the day added. Restore points forgotten since are not counted, so the curve is that of what is kept. At most the last `days` days (default 365, at most 3650).",
        query: [{ name: "days", description: "At most this many days (default 365)", type: "integer" }],
        responses: {
          200: ["The samples, oldest first", "RepositoryHistory"],
          ...err(404, "No such repository"),
        },
        handle: ({ params, query }) => {
          const days = queryInt(query, "days", 365, 3650);
          const r = this.repositoryOf(params.name!);
          const id = this.repoId(r.name);
          const points = (id === undefined ? [] : this.catalog.restorePoints({ repository: id })).sort(
            (a, b) => a.timeMs - b.timeMs,
          );
          const DAY = 86_400_000;
          const samples: Array<{
            day: string;
            logicalBytes: number;
            storedBytes: number;
            ratio: number | null;
            addedBytes: number;
            restorePoints: number;
          }> = [];
          let logical = 0;
          let stored = 0;
          let count = 0;
          for (const p of points) {
            const day = new Date(Math.floor(p.timeMs / DAY) * DAY).toISOString().slice(0, 10);
            logical += p.size;
            stored += p.bytesStored;
            count++;
            let last = samples.at(-1);
            if (last?.day !== day) {
              last = { day, logicalBytes: 0, storedBytes: 0, ratio: null, addedBytes: 0, restorePoints: 0 };
              samples.push(last);
            }
            last.logicalBytes = logical;
            last.storedBytes = stored;
            last.ratio = stored > 0 ? logical / stored : null;
            last.addedBytes += p.bytesStored;
            last.restorePoints = count;
          }
          return [200, { name: r.name, samples: samples.slice(-days) }];
        },
      },
      {
        method: "GET",
        path: "/api/v1/vms",
        action: "vms.list",
        summary: "VMs and their protection state",
        description:
          "Every VM the daemon knows (found by an adapter or named in the configuration), with, per policy that backs it up, its last good restore point and whether the RPO is met: a restore point younger than the schedule's interval plus its jitter (plus the time that restore point took).",
        responses: { 200: ["The VMs", { type: "array", items: { $ref: "#/components/schemas/Vm" } }] },
        handle: async () => {
          const names = new Set(d.knownVms().map((v) => v.name));
          for (const e of d.entries()) if (e.job.vm !== "") names.add(e.job.vm);
          const ctx = this.vmContext();
          const sorted = [...names].sort();
          const cdp = await this.cdpViews(sorted);
          return [200, sorted.map((n) => ({ ...this.vmView(n, ctx), cdp: cdp.get(n) ?? null }))];
        },
      },
      {
        method: "GET",
        path: "/api/v1/vms/{vm}/restore-points",
        action: "points.list",
        summary: "A VM's restore points, newest first, a page at a time",
        query: [
          { name: "limit", description: "At most this many (default 50, at most 1000)", type: "integer" },
          { name: "offset", description: "Skip this many of the newest (default 0)", type: "integer" },
        ],
        responses: { 200: ["One page", "RestorePointPage"], ...err(404, "No such VM") },
        handle: async ({ params, query }) => {
          const vm = params.vm!;
          const limit = queryInt(query, "limit", 50, 1000);
          const offset = queryInt(query, "offset", 0, Number.MAX_SAFE_INTEGER);
          const all = this.catalog.restorePoints({ vm }).reverse();
          if (all.length === 0 && !d.knownVms().some((v) => v.name === vm))
            throw new StrataError(ErrorCode.NOT_FOUND, `no VM "${vm}" and no restore points of it`);
          const items = all.slice(offset, offset + limit).map(pointView);
          const next = offset + items.length < all.length ? offset + items.length : null;
          const cdp = (await this.cdpViews([vm])).get(vm) ?? null;
          return [200, { vm, total: all.length, offset, limit, nextOffset: next, items, cdp }];
        },
      },
      {
        method: "GET",
        path: "/api/v1/jobs",
        action: "jobs.list",
        summary: "Jobs, each with its next due time, its running run and its recent runs",
        query: [
          { name: "runs", description: "Recent runs per job (default 5, at most 100)", type: "integer" },
        ],
        responses: { 200: ["The jobs", { type: "array", items: { $ref: "#/components/schemas/Job" } }] },
        handle: ({ query }) => {
          const n = queryInt(query, "runs", 5, 100);
          return [200, d.entries().map((e) => this.jobView(e.job, n))];
        },
      },
      {
        method: "POST",
        path: "/api/v1/jobs/{id}/run",
        action: (params) => {
          const kind = this.jobOf(params).kind;
          return kind === "backup"
            ? "backup.start"
            : kind === "verify"
              ? "verify.start"
              : kind === "retention"
                ? "forget.run"
                : "jobs.manage";
        },
        summary: "Start a job now",
        description:
          "Starts the job at once when the limits allow (202, status started, with the run), else queues it (202, status queued). A job already running answers 409 with that run. Backups need backup.start, verify jobs verify.start, retention jobs forget.run.",
        responses: {
          202: ["Started or queued", "RunNow"],
          ...err(404, "No such job in the configuration now"),
          409: ["Already running", "RunNow"],
        },
        handle: ({ params, who }) => {
          const job = this.jobOf(params);
          const r = d.runNow(job.id);
          if (r.status === "started") this.catalog.log(r.run.id, "info", `started by ${who}`);
          return [r.status === "running" ? 409 : 202, r];
        },
      },
      {
        method: "GET",
        path: "/api/v1/runs/{id}",
        action: "jobs.logs",
        summary: "A run and its log",
        responses: { 200: ["The run", "RunWithLog"], ...err(404, "No such run") },
        handle: ({ params }) => {
          const run = this.runOf(params);
          return [200, { ...run, log: this.catalog.logs(run.id) }];
        },
      },
      {
        method: "POST",
        path: "/api/v1/runs/{id}/cancel",
        action: "jobs.cancel",
        summary: "Cancel a running run",
        description: "The run stops, cleans up and ends cancelled; 409 when it is not running.",
        responses: { 202: ["Cancelling", "Run"], ...err(404, "No such run"), ...err(409, "Not running") },
        handle: ({ params, who }) => {
          const run = this.runOf(params);
          if (!d.cancel(run.id, `by ${who} through the API`))
            throw new StrataError(ErrorCode.TARGET_CONFLICT, `run ${run.id} is not running (${run.outcome})`);
          return [202, run];
        },
      },
      {
        method: "GET",
        path: "/api/v1/runs/{id}/events",
        action: "jobs.logs",
        summary: "Live progress of a run, as server-sent events",
        contentType: "text/event-stream",
        description:
          "text/event-stream: `log` events (the log so far, then new lines), `progress` events ({done, total} in bytes), and one `end` event with the run as recorded, after which the stream closes. A run that has ended gets its log and its end at once.",
        responses: { 200: ["The event stream", { type: "string" }], ...err(404, "No such run") },
        handle: (call) => this.events(call),
      },
      {
        method: "GET",
        path: "/api/v1/policies/{name}/retention-preview",
        action: "retention.preview",
        summary: "Which restore points the policy's retention would remove now",
        responses: {
          200: ["Per VM: what is kept (and by which rules) and what would go", "RetentionPreview"],
          ...err(400, "The policy has no retention"),
          ...err(404, "No such policy"),
        },
        handle: async ({ params }) => {
          const p = this.policyOf(params);
          if (!p.retention)
            throw new StrataError(ErrorCode.USAGE, `policy ${p.name} has no retention: it removes nothing`);
          const vms = [
            ...new Set(
              d
                .entries()
                .filter((e) => e.policy.name === p.name && e.job.kind === "backup")
                .map((e) => e.job.vm),
            ),
          ];
          const repo = await openRepository(d.config.repositories.get(p.repository)!, 1);
          try {
            const out = [];
            for (const vm of vms) {
              const plan = await forget(repo, p.retention, { vm, dryRun: true });
              out.push({ vm, keep: plan.keep, remove: plan.remove });
            }
            return [200, { policy: p.name, repository: p.repository, retention: p.retention, vms: out }];
          } finally {
            await repo.close();
          }
        },
      },
      {
        method: "GET",
        path: "/metrics",
        action: "metrics.read",
        contentType: "text/plain",
        summary: "Prometheus metrics",
        description:
          "Text format 0.0.4: per VM and policy the newest restore point's time and age, the RPO and whether it is met; per job its runs by outcome and its newest success (time, duration, bytes); runs going on and jobs queued.",
        responses: { 200: ["The metrics", { type: "string" }] },
        handle: (call) => this.metrics(call),
      },
      {
        method: "GET",
        path: "/api/v1/repositories/{name}/stats",
        action: "repo.stats",
        summary: "A repository's figures, from its manifests",
        responses: { 200: ["The figures", "RepositoryStats"], ...err(404, "No such repository") },
        handle: async ({ params }) => {
          const r = this.repositoryOf(params.name!);
          const repo = await openRepository(r, 1);
          try {
            let damaged = 0;
            const snaps = await repo.snapshots(undefined, () => damaged++);
            let size = 0;
            let stored = 0;
            for (const s of snaps) {
              const t = manifestTotals(s.manifest);
              size += t.size;
              stored += t.bytesStored;
            }
            return [
              200,
              {
                name: r.name,
                id: repo.config.id,
                location: r.path,
                encrypted: repo.encrypted,
                chunkSize: repo.chunkSize,
                formatVersion: repo.config.version,
                restorePoints: snaps.length,
                damagedRestorePoints: damaged,
                vms: new Set(snaps.map((s) => s.vm)).size,
                logicalBytes: size,
                storedBytes: stored,
                dedupRatio: stored > 0 ? size / stored : null,
                newest:
                  snaps.length > 0
                    ? snaps
                        .map((s) => s.time)
                        .sort()
                        .at(-1)
                    : null,
              },
            ];
          } finally {
            await repo.close();
          }
        },
      },
      ...dataRoutes(d, this.o.data),
    ];
  }

  /** Prometheus metrics (text format 0.0.4) from the daemon's state and the catalog. */
  private metrics(call: Call): undefined {
    const d = this.o.daemon;
    const lines: string[] = [];
    const families = new Map<string, string[]>();
    const add = (name: string, help: string, type: string, labels: Record<string, string>, value: number) => {
      if (!families.has(name)) families.set(name, [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`]);
      const l = Object.entries(labels)
        .map(([k, v]) => `${k}="${v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`)
        .join(",");
      families.get(name)!.push(`${name}${l ? `{${l}}` : ""} ${Number.isFinite(value) ? value : "NaN"}`);
    };
    add("strata_runs_running", "Runs going on now", "gauge", {}, d.running().length);
    add("strata_jobs_queued", "Jobs waiting for a slot within the limits", "gauge", {}, d.queued().length);
    const ctx = this.vmContext();
    for (const name of new Set(
      d
        .entries()
        .filter((e) => e.job.kind === "backup")
        .map((e) => e.job.vm),
    )) {
      for (const p of this.vmView(name, ctx).policies) {
        const labels = { vm: name, policy: p.policy, repository: p.repository };
        if (p.lastRestorePoint) {
          add(
            "strata_vm_last_restore_point_timestamp_seconds",
            "Time of the VM's newest restore point",
            "gauge",
            labels,
            Date.parse(p.lastRestorePoint.time) / 1000,
          );
          add(
            "strata_vm_restore_point_age_seconds",
            "Age of the VM's newest restore point",
            "gauge",
            labels,
            p.ageMs! / 1000,
          );
        }
        if (p.rpoMs !== null)
          add("strata_vm_rpo_seconds", "The RPO the policy's schedule sets", "gauge", labels, p.rpoMs / 1000);
        add(
          "strata_vm_rpo_met",
          "1 when the newest restore point is within the RPO",
          "gauge",
          labels,
          p.rpoMet ? 1 : 0,
        );
      }
    }
    const counts = this.catalog.runCounts();
    for (const e of d.entries()) {
      const labels = { policy: e.job.policy, vm: e.job.vm, kind: e.job.kind };
      for (const c of counts.filter((x) => x.jobId === e.job.id))
        add(
          "strata_runs_total",
          "Runs of the job, by outcome",
          "counter",
          { ...labels, outcome: c.outcome },
          c.n,
        );
      const ok = this.catalog.lastSuccess(e.job.id);
      if (ok) {
        add(
          "strata_job_last_success_timestamp_seconds",
          "End of the job's newest successful run",
          "gauge",
          labels,
          (ok.endedAt ?? 0) / 1000,
        );
        add(
          "strata_job_last_success_duration_seconds",
          "Duration of that run",
          "gauge",
          labels,
          (ok.durationMs ?? 0) / 1000,
        );
        add("strata_job_last_success_bytes_read", "Bytes that run read", "gauge", labels, ok.bytesRead);
        add(
          "strata_job_last_success_bytes_stored",
          "Bytes that run stored (new, compressed)",
          "gauge",
          labels,
          ok.bytesStored,
        );
      }
      const last = this.catalog.lastRun(e.job.id);
      if (last && last.outcome !== "running")
        add(
          "strata_job_last_run_failed",
          "1 when the job's newest ended run failed, was cancelled or interrupted",
          "gauge",
          labels,
          ["failed", "cancelled", "interrupted"].includes(last.outcome) ? 1 : 0,
        );
    }
    for (const f of families.values()) lines.push(...f);
    const text = `${lines.join("\n")}\n`;
    call.res.writeHead(200, {
      "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
      "Content-Length": Buffer.byteLength(text),
      "Cache-Control": "no-store",
    });
    call.res.end(text);
    return undefined;
  }

  /** The OpenAPI 3.0 document of {@link routes}. */
  openapi(): Record<string, unknown> {
    const paths: Record<string, Record<string, unknown>> = {};
    const schemaRef = (s: string | Record<string, unknown>) =>
      typeof s === "string" ? { $ref: `#/components/schemas/${s}` } : s;
    for (const r of this.routes) {
      const names = [...r.path.matchAll(/\{(\w+)\}/g)].map((m) => m[1]!);
      const responses: Record<string, unknown> = {};
      for (const [status, [description, schema]] of Object.entries(r.responses)) {
        const type = status === "200" && r.contentType ? r.contentType : "application/json";
        responses[status] = { description, content: { [type]: { schema: schemaRef(schema) } } };
      }
      if (r.action !== null) {
        responses["401"] = {
          description: "No token, or a malformed, unknown, revoked or expired one",
          content: { "application/json": { schema: schemaRef("Error") } },
        };
        responses["403"] ??= {
          description: "The token's role may not do this",
          content: { "application/json": { schema: schemaRef("Error") } },
        };
      }
      const action =
        r.action === null ? "none" : typeof r.action === "string" ? r.action : "depends on the job's kind";
      paths[r.path] ??= {};
      paths[r.path]![r.method.toLowerCase()] = {
        summary: r.summary,
        description: `${r.description ?? r.summary}\n\nAction (src/catalog/roles.ts): ${action}.`,
        operationId: `${r.method.toLowerCase()}${r.path
          .replace(/^\/api\/v1/, "")
          .replace(/[{}]/g, "")
          .split(/[/.-]/)
          .filter(Boolean)
          .map((w) => w[0]!.toUpperCase() + w.slice(1))
          .join("")}`,
        ...(r.action === null ? { security: [] } : {}),
        parameters: [
          ...names.map((n) => ({
            name: n,
            in: "path",
            required: true,
            schema: n === "id" ? { type: "integer" } : { type: "string" },
          })),
          ...(r.query ?? []).map((q) => ({
            name: q.name,
            in: "query",
            required: false,
            description: q.description,
            schema: { type: q.type },
          })),
        ],
        ...(r.body
          ? {
              requestBody: {
                required: false,
                content: {
                  "application/json": {
                    schema: { type: "object", additionalProperties: false, properties: r.body },
                  },
                },
              },
            }
          : {}),
        responses,
      };
    }
    const obj = (properties: Record<string, unknown>) => ({ type: "object", properties });
    const int = { type: "integer" };
    const str = { type: "string" };
    const nstr = { type: "string", nullable: true };
    const nint = { type: "integer", nullable: true };
    const run = obj({
      id: int,
      jobId: int,
      trigger: { type: "string", enum: ["schedule", "missed", "manual", "rerun"] },
      scheduledFor: nint,
      rerunOf: nint,
      host: str,
      pid: int,
      startedAt: int,
      endedAt: nint,
      outcome: {
        type: "string",
        enum: ["running", "success", "warning", "failed", "cancelled", "interrupted"],
      },
      durationMs: nint,
      bytesRead: int,
      bytesNew: int,
      bytesStored: int,
      progressDone: int,
      progressTotal: int,
      restorePoint: nstr,
      errorCode: nstr,
      error: nstr,
    });
    const point = obj({
      id: str,
      repository: str,
      vm: str,
      time: str,
      mode: str,
      consistency: str,
      parent: nstr,
      disks: int,
      size: int,
      bytesRead: int,
      bytesNew: int,
      bytesStored: int,
      durationMs: int,
      host: str,
      runId: nint,
      bootVerifiedAt: nint,
      bootOutcome: { type: "string", enum: ["passed", "failed"], nullable: true },
      bootAnswerMs: nint,
      bootError: nstr,
    });
    return {
      openapi: "3.0.3",
      info: {
        title: "Strata daemon API",
        version: "1",
        description:
          "Host-level backup of KVM/QEMU VMs. Every call but this document needs `Authorization: Bearer strata_<id>_<secret>` (strata token create --role admin|operator|backup|read), except on the daemon's owner-only unix socket, where a call without the header acts as the local administrator.",
      },
      servers: [{ url: "/" }],
      security: [{ bearerAuth: [] }],
      paths,
      components: {
        securitySchemes: {
          bearerAuth: { type: "http", scheme: "bearer", bearerFormat: "strata_<id>_<secret>" },
        },
        schemas: {
          Error: obj({ error: obj({ code: str, message: str }) }),
          Run: run,
          RunWithLog: {
            allOf: [
              { $ref: "#/components/schemas/Run" },
              obj({
                log: {
                  type: "array",
                  items: obj({ id: int, runId: int, time: int, level: str, message: str }),
                },
              }),
            ],
          },
          Job: obj({
            id: int,
            policy: str,
            vm: str,
            kind: { type: "string", enum: ["backup", "verify", "retention", "gc", "boot-verify"] },
            repository: str,
            schedule: nstr,
            nextDue: nstr,
            queued: { type: "boolean" },
            running: { allOf: [{ $ref: "#/components/schemas/Run" }], nullable: true },
            runs: { type: "array", items: { $ref: "#/components/schemas/Run" } },
          }),
          RunNow: obj({
            status: { type: "string", enum: ["started", "queued", "running"] },
            run: { $ref: "#/components/schemas/Run" },
            job: { type: "object" },
          }),
          RestorePoint: point,
          RestorePointPage: obj({
            vm: str,
            total: int,
            offset: int,
            limit: int,
            nextOffset: nint,
            items: { type: "array", items: { $ref: "#/components/schemas/RestorePoint" } },
            cdp: { allOf: [{ $ref: "#/components/schemas/Cdp" }], nullable: true },
          }),
          Cdp: {
            ...obj({
              state: { type: "string", enum: ["starting", "running", "restarting", "stopping", "stopped"] },
              policy: str,
              journal: nstr,
              pid: nint,
              starts: int,
              lastExit: nstr,
              from: { type: "string", format: "date-time", nullable: true },
              to: { type: "string", format: "date-time", nullable: true },
              journalBytes: int,
              lagMs: nint,
              gaps: {
                type: "array",
                items: obj({
                  from: { type: "string", format: "date-time" },
                  to: { type: "string", format: "date-time", nullable: true },
                }),
              },
              marks: {
                type: "array",
                items: obj({ name: str, time: { type: "string", format: "date-time" } }),
              },
            }),
            description:
              "Continuous data protection: the daemon's strata protect of the VM and the window its journal can restore (from..to), the gaps inside it when protection was down, its size, and the lag of the oldest write not yet fdatasynced",
          },
          Vm: obj({
            cdp: { allOf: [{ $ref: "#/components/schemas/Cdp" }], nullable: true },
            name: str,
            adapter: nstr,
            state: str,
            tags: { type: "array", items: str },
            sources: { type: "array", items: str },
            protected: { type: "boolean" },
            policies: {
              type: "array",
              items: obj({
                policy: str,
                repository: str,
                jobId: int,
                schedule: str,
                lastRestorePoint: { allOf: [{ $ref: "#/components/schemas/RestorePoint" }], nullable: true },
                ageMs: nint,
                rpoMs: nint,
                rpoMet: { type: "boolean" },
                lastRun: { allOf: [{ $ref: "#/components/schemas/Run" }], nullable: true },
              }),
            },
          }),
          RetentionPreview: obj({
            policy: str,
            repository: str,
            retention: { type: "object", additionalProperties: int },
            vms: {
              type: "array",
              items: obj({
                vm: str,
                keep: { type: "array", items: obj({ id: str, reasons: { type: "array", items: str } }) },
                remove: { type: "array", items: str },
              }),
            },
          }),
          Whoami: obj({
            token: { ...obj({ id: str, name: str, expiresAt: nint }), nullable: true },
            role: { type: "string", enum: ["admin", "operator", "backup", "read"] },
            actions: { type: "array", items: str },
          }),
          Repository: obj({ name: str, location: str, restorePoints: int, storedBytes: int }),
          RepositoryHistory: obj({
            name: str,
            samples: {
              type: "array",
              items: obj({
                day: str,
                logicalBytes: int,
                storedBytes: int,
                ratio: { type: "number", nullable: true },
                addedBytes: int,
                restorePoints: int,
              }),
            },
          }),
          Layout: obj({
            id: str,
            disks: {
              type: "array",
              items: obj({
                disk: str,
                size: int,
                scheme: str,
                partitions: {
                  type: "array",
                  items: obj({
                    number: int,
                    start: int,
                    size: int,
                    typeName: str,
                    label: str,
                    filesystem: nstr,
                    volumeGroup: str,
                  }),
                },
              }),
            },
            volumeGroups: {
              type: "array",
              items: obj({
                name: str,
                size: int,
                pvs: { type: "array", items: { type: "object" } },
                lvs: { type: "array", items: obj({ name: str, size: int, layout: str }) },
              }),
            },
            warnings: { type: "array", items: str },
          }),
          FilePage: obj({
            id: str,
            disk: str,
            partition: nint,
            volume: nstr,
            filesystem: str,
            path: str,
            total: int,
            offset: int,
            limit: int,
            nextOffset: nint,
            entries: {
              type: "array",
              items: obj({
                name: str,
                path: str,
                kind: { type: "string", enum: ["file", "directory", "symlink", "other"] },
                mode: int,
                uid: int,
                gid: int,
                size: int,
                mtime: int,
                atime: int,
                target: str,
              }),
            },
          }),
          Forgotten: obj({
            repository: str,
            removed: { type: "array", items: str },
            locked: { type: "array", items: obj({ id: str, until: str }) },
          }),
          Instant: obj({
            name: str,
            restorePoint: str,
            phase: { type: "string", enum: ["starting", "running", "migrating", "migrated", "stopped"] },
            adapter: str,
            vm: obj({ pid: nint, running: { type: "boolean" }, where: nstr }),
            serve: obj({ pid: nint, running: { type: "boolean" }, socket: str, log: str }),
            disks: {
              type: "array",
              items: obj({ name: str, size: int, overlay: nstr, production: str, format: str }),
            },
            dir: str,
            warnings: { type: "array", items: str },
          }),
          InstantStopped: obj({
            name: str,
            vm: { type: "string", enum: ["quit", "powerdown", "killed", "not running"] },
            discarded: { type: "array", items: str },
          }),
          RepositoryStats: obj({
            name: str,
            id: str,
            location: str,
            encrypted: { type: "boolean" },
            chunkSize: int,
            formatVersion: int,
            restorePoints: int,
            damagedRestorePoints: int,
            vms: int,
            logicalBytes: int,
            storedBytes: int,
            dedupRatio: { type: "number", nullable: true },
            newest: nstr,
          }),
        },
      },
    };
  }
}

function pointView(p: RestorePointRow) {
  const { timeMs: _t, ...rest } = p;
  return { id: `${p.vm}/${p.time}`, ...rest };
}

function errorBody(code: string, message: string) {
  return { error: { code, message } };
}
