/** daemon: the backup service in the foreground; daemon --check: its configuration checked and summarized. */
import { resolve } from "node:path";
import type { Command } from "commander";
import { Catalog, DEFAULT_CATALOG } from "../catalog/catalog.js";
import type { LogLevel } from "../catalog/schema.js";
import type { VmSummary } from "../hypervisor/adapter.js";
import { DEFAULT_CACHE_BYTES, defaultCacheDir } from "../repo/cached-store.js";
import type { Immutability } from "../repo/repository.js";
import type { KeepPolicy } from "../repo/retention.js";
import { Api } from "../server/api.js";
import { CdpSupervisor } from "../server/cdp.js";
import {
  type CdpPolicy,
  checkConfigFile,
  type DaemonConfig,
  DEFAULT_CONFIG,
  formatProblem,
  type HostLimits,
  invalidConfig,
  type JobLimits,
  repoArgs,
} from "../server/config.js";
import { type JobSpec, planJobs } from "../server/jobs.js";
import { listenApi } from "../server/listen.js";
import { Notifier } from "../server/notify.js";
import { createJobRunner } from "../server/runner.js";
import { nextDue, nextSlot } from "../server/schedule.js";
import { monotonicUsec, sdNotify } from "../server/sd-notify.js";
import { Daemon, reniceProcess } from "../server/service.js";
import { formatDuration } from "../util/durations.js";
import { describeError } from "../util/errors.js";
import { applyIoLimits, describeMechanism, detectIoMechanism, type IoLimits } from "../util/io-control.js";
import { printable } from "../util/names.js";
import { formatBytes } from "../util/sizes.js";
import { buildRegistry, DEFAULT_INVENTORY, defaultStateDir, listHostVms, schemeOf } from "./adapters.js";
import { output } from "./context.js";

const iso = (ms: number | undefined) =>
  ms === undefined ? "never" : new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");

export function registerDaemonCommand(program: Command): void {
  program
    .command("daemon")
    .description("the backup service: runs each policy's jobs on schedule, within the host's limits")
    .option("--config <file>", `the configuration (default: $STRATA_CONFIG or ${DEFAULT_CONFIG})`)
    .option(
      "--check",
      "check the configuration, print every problem with its line, and show what it would do",
    )
    .addHelpText(
      "after",
      `
The daemon backs up VMs by policy: each policy names a repository, the VMs it covers, a
schedule, retention, verification and limits. It runs in the foreground (systemd's
Type=notify: READY=1 once it listens, STOPPING=1 on stop, STATUS= lines, through
systemd-notify), logs to stdout (info) and stderr (warnings, errors), and stops on SIGTERM or
SIGINT, cancelling running jobs and recording them as cancelled. SIGHUP reads the file again:
checked first, and on any problem (each logged with its line) the running configuration stays;
runs going on finish under the one they started with; api, catalog, state-dir, inventory,
limits.bandwidth and limits.nice take a restart. Every run is recorded in
the catalog (catalog: in the file, else $STRATA_CATALOG or ${DEFAULT_CATALOG}): trigger, start and
end, outcome, bytes, progress, errors and log lines; "strata jobs" lists them.

The REST API (JSON, described at /api/v1/openapi.json) listens on the unix socket api.socket
(default /run/strata/strata.sock; plain HTTP, mode 0600) and, with api.https, on a TCP port over
HTTPS (a self-signed certificate is made in the state folder unless cert and key are given; its
SHA-256 fingerprint is logged). Calls carry "Authorization: Bearer strata_..." from
"strata token create --role admin|operator|backup|read"; on the socket a call without one acts as
the local administrator. Every refused call is logged with its reason.

--check reads the file, prints every problem as FILE:LINE:COLUMN (and exits 2), or a summary:
each policy, the VMs it covers now (asked from every platform adapter, as "strata vms" does)
and when each job runs next, and how this host enforces the disk limits.

Disk limits (io-read, io-write, io-weight) are the kernel's, on the daemon's whole process: a
cgroup v2 child "strata" with io.max and io.weight when the v2 tree has the io controller (under
systemd the unit delegates its cgroup); else a cgroup v1 blkio child with
blkio.throttle.read_bps_device/write_bps_device (hybrid hosts), the weight as an ioprio; else
only the weight, as an ioprio (ionice best-effort 4-7). A live backup's disk reads are QEMU's:
job-bandwidth paces them and sets QEMU's block-job speed (the kernel limits do not reach them).

A configuration:

  repositories:
    main:
      path: /backup/strata
      password-file: /etc/strata/main.pass     # for an encrypted repository
  limits:                     # the host's
    jobs: 2                   # jobs at once (default 2)
    jobs-per-repository: 1    # (default 1)
    bandwidth: 400            # MiB/s read by all jobs together
    job-bandwidth: 200        # MiB/s read by one job
    worker-threads: 2
    nice: 10                  # (default 10)
    io-weight: 50             # disk share, 1-10000: cgroup v2 io.weight, else ioprio
    io-read: 300              # MiB/s the daemon reads from each disk (kernel-enforced)
    io-write: 300             # MiB/s it writes to each disk
  state-dir: /var/lib/strata/state
  api:
    socket: /run/strata/strata.sock
    https: { listen: 8443 }   # or "127.0.0.1:8443"; cert: and key: for your own certificate
  vms:                        # VMs named by their sources, beside those the adapters find
    lab1: { sources: ["file:/var/lib/images/lab1.img"], tags: [lab] }
  policies:
    web:
      repository: main
      vms: { globs: ["web-*"], tags: [production], exclude: ["*-test"] }   # or: vms: all
      schedule: every 15m     # or cron, 5 fields: "0 2 * * *"; in timezone: (top level) or TZ
      jitter: 2m              # each VM's runs move by a fixed share of this
      mode: snapshot          # snapshot | pause | offline
      quiesce: try            # require | try | off
      retention: { keep-last: 4, keep-daily: 7, keep-weekly: 4 }   # strata forget's rules
      verify: { schedule: "0 4 * * *", read-data: false }
      # boot verification of each VM's newest restore point (strata verify --boot):
      #   verify: { schedule: ..., boot: { schedule: "0 5 * * 0", timeout: 5m, command: "systemctl is-system-running" } }
      limits: { job-bandwidth: 100 }
  notifications:              # on failure, recovery, RPO missed and met again
    webhooks:
      - url: https://hooks.example.com/strata
    email:
      host: smtp.example.com
      from: strata@backup1.example.com
      to: [ops@example.com]
      events: [failure, rpo-missed]

Tags come from the VM inventory (tags: [...] on an entry of /etc/strata/vms.yaml; inventory:
in this file names another). A schedule missed while the daemon was down runs once when it
comes back; a run that was going when it died is marked interrupted and run again.

Examples:
  strata daemon --check
  strata daemon --check --config ./strata.yaml --json
  strata daemon --config ./strata.yaml          # the service, in the foreground`,
    )
    .action(async (opts: { config?: string; check?: boolean }, cmd: Command) => {
      const out = output(cmd);
      const file = resolve(opts.config ?? process.env.STRATA_CONFIG ?? DEFAULT_CONFIG);
      if (opts.check !== true) return serve(file);
      const checked = checkConfigFile(file);
      if (!checked.config) {
        if (out.json) out.result({ type: "summary", ok: false, file, problems: checked.problems }, () => "");
        throw invalidConfig(file, checked.problems);
      }
      const config = checked.config;
      const inventory = config.inventory ?? DEFAULT_INVENTORY;
      const host = await listHostVms({ inventory });
      for (const u of host.unreachable) out.warn(`${u.adapter}: cannot list its VMs: ${u.error}`);
      // The VMs the file names by their sources, as the daemon adds them (they win over a namesake).
      const named = new Set(config.vms.keys());
      const vms: VmSummary[] = [
        ...host.vms.filter((v) => !named.has(v.name)),
        ...[...config.vms.values()].map((v) => ({
          adapter: schemeOf(v.sources[0]!),
          source: v.sources.join(" "),
          name: v.name,
          state: "unknown" as const,
          tags: v.tags,
        })),
      ];
      const summary = summarize(config, vms, Date.now());
      for (const w of summary.warnings) out.warn(w);
      out.result({ type: "summary", ok: true, file, ...summary, unreachable: host.unreachable }, () =>
        render(config, summary),
      );
    });
}

/** The service, until SIGTERM or SIGINT. */
async function serve(file: string): Promise<void> {
  let config = (() => {
    const checked = checkConfigFile(file);
    if (!checked.config) throw invalidConfig(file, checked.problems);
    return checked.config;
  })();
  const log = (level: LogLevel, message: string) =>
    (level === "warn" || level === "error" ? process.stderr : process.stdout).write(`${level}: ${message}\n`);
  if (config.limits.nice !== undefined) {
    const r = reniceProcess(config.limits.nice);
    if (r.refused) log("warn", `cannot set nice ${config.limits.nice} on the daemon's threads: ${r.refused}`);
  }
  const io = ioLimits(config.limits);
  if (io) {
    const r = await applyIoLimits(io);
    log("info", `disk limits: ${r.summary}`);
    for (const refused of r.refused) log("warn", `disk limit not applied: ${refused}`);
  }
  const catalog = Catalog.open(resolve(config.catalog ?? process.env.STRATA_CATALOG ?? DEFAULT_CATALOG));
  const inventory = config.inventory ?? DEFAULT_INVENTORY;
  const registry = buildRegistry({ inventory });
  const stateDir = config.stateDir ?? defaultStateDir();
  let notifier = config.notifications && new Notifier(config.notifications, { log });
  const daemon = new Daemon({
    ...(notifier ? { notifier } : {}),
    config,
    catalog,
    runner: createJobRunner({
      registry,
      catalog,
      stateDir,
      ...(config.limits.bandwidth === undefined ? {} : { hostBandwidth: config.limits.bandwidth }),
      serveCommand: (ref, r) => [
        process.execPath,
        resolve(process.argv[1]!),
        "serve",
        ref,
        ...repoArgs(r),
        "--cache-size",
        "64M",
      ],
    }),
    listVms: () => listHostVms({ inventory }),
    log,
    cdp: new CdpSupervisor({
      strataCommand: [process.execPath, resolve(process.argv[1] ?? "strata")],
      stateDir,
      inventory,
      log,
    }),
  });
  const status = () =>
    `${daemon.entries().length} job(s), ${daemon.running().length} running; API on ${config.api.socket}` +
    (config.api.https ? ` and https ${config.api.https.host}:${config.api.https.port}` : "");
  /** SIGHUP: the file checked again; on any problem the running configuration stays. */
  const reload = async () => {
    await sdNotify(
      { RELOADING: "1", MONOTONIC_USEC: monotonicUsec(), STATUS: "reloading the configuration" },
      log,
    );
    const checked = checkConfigFile(file);
    if (!checked.config) {
      for (const p of checked.problems) log("error", `reload: ${formatProblem(file, p)}`);
      log(
        "error",
        `reload: ${checked.problems.length} problem(s) in ${file}: the configuration running stays`,
      );
      await sdNotify(
        { READY: "1", STATUS: `reload refused (${checked.problems.length} problem(s)); ${status()}` },
        log,
      );
      return;
    }
    const next = checked.config;
    for (const [what, a, b] of [
      ["api", config.api, next.api],
      ["catalog", config.catalog, next.catalog],
      ["state-dir", config.stateDir, next.stateDir],
      ["inventory", config.inventory, next.inventory],
      ["limits.bandwidth", config.limits.bandwidth, next.limits.bandwidth],
      ["limits.nice", config.limits.nice, next.limits.nice],
    ] as const)
      if (JSON.stringify(a) !== JSON.stringify(b))
        log("warn", `reload: ${what} changed: it takes effect when the daemon restarts`);
    const old = notifier;
    notifier = next.notifications && new Notifier(next.notifications, { log });
    await daemon.reload(next, notifier);
    old?.close().catch(() => {});
    config = next;
    await sdNotify({ READY: "1", STATUS: status() }, log);
  };
  let listening: Awaited<ReturnType<typeof listenApi>> | undefined;
  const onHup = () => {
    log("info", "SIGHUP: reloading the configuration");
    reload().catch((err) => log("error", `reload: ${describeError(err)}`));
  };
  try {
    await new Promise<void>((done, fail) => {
      const stop = (sig: string) => {
        log("info", `${sig}: stopping`);
        process.off("SIGHUP", onHup);
        sdNotify(
          { STOPPING: "1", STATUS: `stopping (${sig}): cancelling ${daemon.running().length} run(s)` },
          log,
        )
          .then(() => daemon.stop(`the daemon received ${sig}`))
          .then(done, fail);
      };
      process.once("SIGTERM", () => stop("SIGTERM"));
      process.once("SIGINT", () => stop("SIGINT"));
      process.on("SIGHUP", onHup);
      (async () => {
        const api = new Api({
          daemon,
          log,
          data: {
            registry,
            stateDir,
            strataCommand: [process.execPath, resolve(process.argv[1] ?? "strata")],
          },
        });
        // Started first: its first listing of the VMs is under way before the API takes a call,
        // and every call waits for it. Listening comes right after, so a port in use is known at once.
        const starting = daemon.start();
        starting.catch(() => {}); // awaited below, after listening
        listening = await listenApi(api, config.api, { stateDir, log });
        await starting;
        await sdNotify({ READY: "1", STATUS: status() }, log);
      })().catch(fail);
    });
    log("info", "stopped");
  } finally {
    process.off("SIGHUP", onHup);
    await listening?.close();
    await notifier?.close();
    catalog.close();
  }
}

interface PolicySummary {
  name: string;
  repository: string;
  schedule: string;
  jitterMs: number;
  /** The schedule's next slot, before each VM's jitter. */
  nextSlot: string;
  vms: Array<{ name: string; source: string; nextRun: string }>;
  mode?: string;
  quiesce?: string;
  retention?: KeepPolicy;
  immutable?: Immutability;
  cdp?: CdpPolicy;
  verify?: {
    schedule: string;
    readData: boolean;
    readDataParts?: number;
    nextRun: string;
    boot?: { schedule: string; timeoutMs: number; command?: string[] };
  };
  limits: JobLimits;
}

function summarize(config: DaemonConfig, vms: VmSummary[], now: number) {
  const jobs = planJobs(config, vms);
  const source = new Map(vms.map((v) => [v.name, v.source]));
  const next = (spec: JobSpec | undefined) => iso(spec?.timed && nextDue(spec.timed, now));
  const policies: PolicySummary[] = [...config.policies.values()].map((p) => {
    const mine = jobs.filter((j) => j.policy === p.name);
    return {
      name: p.name,
      repository: p.repository,
      schedule: p.schedule.text,
      jitterMs: p.jitterMs,
      nextSlot: iso(nextSlot(p.schedule, now)),
      vms: mine
        .filter((j) => j.kind === "backup")
        .map((j) => ({ name: j.vm, source: source.get(j.vm) ?? "", nextRun: next(j) })),
      ...(p.mode === undefined ? {} : { mode: p.mode }),
      ...(p.quiesce === undefined ? {} : { quiesce: p.quiesce }),
      ...(p.retention === undefined ? {} : { retention: p.retention }),
      ...(p.immutable === undefined ? {} : { immutable: p.immutable }),
      ...(p.cdp === undefined ? {} : { cdp: p.cdp }),
      ...(p.verify === undefined
        ? {}
        : {
            verify: {
              schedule: p.verify.schedule.text,
              readData: p.verify.readData,
              ...(p.verify.readDataParts === undefined ? {} : { readDataParts: p.verify.readDataParts }),
              nextRun: next(mine.find((j) => j.kind === "verify")),
              ...(p.verify.boot === undefined
                ? {}
                : {
                    boot: {
                      schedule: p.verify.boot.schedule.text,
                      timeoutMs: p.verify.boot.timeoutMs,
                      ...(p.verify.boot.command === undefined ? {} : { command: p.verify.boot.command }),
                    },
                  }),
            },
          }),
      limits: p.limits,
    };
  });
  // VM and repository → the policies that back it up there.
  const covered = new Map<string, string[]>();
  for (const j of jobs)
    if (j.kind === "backup")
      covered.set(`${j.repository}\0${j.vm}`, [...(covered.get(`${j.repository}\0${j.vm}`) ?? []), j.policy]);
  const warnings: string[] = [];
  for (const [k, names] of covered)
    if (names.length > 1) {
      const [repo, vm] = k.split("\0") as [string, string];
      warnings.push(
        `VM ${vm} is backed up to repository ${repo} by ${names.length} policies: ${names.join(", ")}`,
      );
    }
  for (const p of policies)
    if (p.vms.length === 0 && vms.length > 0)
      warnings.push(`policy ${p.name} covers none of the VMs found now`);
  const backedUp = new Set(jobs.filter((j) => j.kind === "backup").map((j) => j.vm));
  const uncovered = vms.filter((vm) => !backedUp.has(vm.name)).map((v) => v.name);
  const mechanism = detectIoMechanism();
  return {
    repositories: [...config.repositories.values()],
    limits: config.limits,
    diskLimits: { mechanism, text: describeMechanism(mechanism) },
    policies,
    uncovered,
    warnings,
  };
}

function limitsText(l: JobLimits & Partial<HostLimits>): string {
  const parts: string[] = [];
  if (l.jobs !== undefined) parts.push(`${l.jobs} job(s) at once`);
  if (l.jobsPerRepository !== undefined) parts.push(`${l.jobsPerRepository} per repository`);
  if (l.bandwidth !== undefined) parts.push(`${l.bandwidth} MiB/s for all jobs`);
  if (l.jobBandwidth !== undefined) parts.push(`${l.jobBandwidth} MiB/s per job`);
  if (l.workerThreads !== undefined) parts.push(`${l.workerThreads} worker thread(s)`);
  if (l.nice !== undefined) parts.push(`nice ${l.nice}`);
  if (l.ioWeight !== undefined) parts.push(`io weight ${l.ioWeight}`);
  if (l.ioRead !== undefined) parts.push(`disk reads ${l.ioRead} MiB/s`);
  if (l.ioWrite !== undefined) parts.push(`disk writes ${l.ioWrite} MiB/s`);
  return parts.length > 0 ? parts.join(", ") : "none";
}

function ioLimits(l: HostLimits): IoLimits | undefined {
  if (l.ioRead === undefined && l.ioWrite === undefined && l.ioWeight === undefined) return undefined;
  return {
    ...(l.ioRead === undefined ? {} : { readMiBs: l.ioRead }),
    ...(l.ioWrite === undefined ? {} : { writeMiBs: l.ioWrite }),
    ...(l.ioWeight === undefined ? {} : { weight: l.ioWeight }),
  };
}

function retentionText(k: KeepPolicy): string {
  return Object.entries(k)
    .map(([rule, n]) => `keep-${rule} ${n}`)
    .join(", ");
}

const count = (n: number, one: string, many: string) => `${n} ${n === 1 ? one : many}`;

function render(config: DaemonConfig, s: ReturnType<typeof summarize>): string {
  const lines = [
    `${config.file}: valid; ${count(s.repositories.length, "repository", "repositories")}, ${count(s.policies.length, "policy", "policies")}`,
    "",
    "repositories:",
    ...s.repositories.map(
      (r) =>
        `  ${r.name}  ${r.path}${r.passwordFile ? ` (password file ${r.passwordFile})` : " (not encrypted)"}` +
        (r.s3 === undefined
          ? ""
          : `; S3 credentials ${r.s3.credentialsFile ? `from ${r.s3.credentialsFile}` : "from the environment"}` +
            `, read cache ${r.s3.cacheBytes === 0 ? "off" : `${formatBytes(r.s3.cacheBytes ?? DEFAULT_CACHE_BYTES)} in ${r.s3.cacheDir ?? defaultCacheDir()}`}`),
    ),
    `host limits: ${limitsText(s.limits)}`,
    `disk limits by ${s.diskLimits.text}`,
    `API: unix socket ${config.api.socket}${config.api.https ? `, HTTPS on ${config.api.https.host}:${config.api.https.port}${config.api.https.cert ? ` (certificate ${config.api.https.cert})` : " (self-signed certificate)"}` : ""}`,
    `API restores may write under ${config.api.restoreTargets.join(", ")}; onto devices ${config.api.restoreDevices.length === 0 ? "none" : config.api.restoreDevices.join(", ")}`,
  ];
  for (const p of s.policies) {
    lines.push(
      "",
      `policy ${p.name} -> repository ${p.repository}`,
      `  schedule   ${p.schedule}${p.jitterMs > 0 ? `, jitter ${formatDuration(p.jitterMs)}` : ""}; next slot ${p.nextSlot}`,
    );
    if (p.vms.length === 0) lines.push("  VMs        none found now");
    else {
      lines.push(`  VMs        ${p.vms.length}, next backup of each:`);
      for (const vm of p.vms)
        lines.push(`    ${printable(vm.name).padEnd(24)} ${vm.nextRun}  ${printable(vm.source)}`);
    }
    if (p.mode !== undefined || p.quiesce !== undefined)
      lines.push(
        `  backup     mode ${p.mode ?? "(source default)"}, quiesce ${p.quiesce ?? "(source default)"}`,
      );
    if (p.retention) lines.push(`  retention  ${retentionText(p.retention)}, after each backup`);
    if (p.immutable)
      lines.push(
        `  immutable  ${p.immutable.mode} for ${formatDuration(p.immutable.seconds * 1000)} after each backup (S3 Object Lock)`,
      );
    if (p.cdp)
      lines.push(
        `  cdp        one strata protect per VM into ${p.cdp.journalDir}/VM${p.cdp.foldMs === undefined ? "" : `, fold every ${formatDuration(p.cdp.foldMs)}`}${p.cdp.windowMs === undefined ? "" : `, window ${formatDuration(p.cdp.windowMs)}`}`,
      );
    if (p.verify)
      lines.push(
        `  verify     ${p.verify.schedule}${p.verify.readData ? ", reading all data" : p.verify.readDataParts ? `, metadata and a rotating 1/${p.verify.readDataParts} of the data (all of it every ${p.verify.readDataParts} runs)` : ", metadata"}; next ${p.verify.nextRun}`,
      );
    if (p.verify?.boot)
      lines.push(
        `  boot       ${p.verify.boot.schedule}: each VM's newest restore point boots without a network; its agent must answer within ${Math.round(p.verify.boot.timeoutMs / 1000)} s` +
          (p.verify.boot.command ? `, then ${printable(p.verify.boot.command.join(" "))} must exit 0` : ""),
      );
    lines.push(`  limits     ${limitsText(p.limits)}`);
  }
  if (s.uncovered.length > 0)
    lines.push("", `VMs no policy covers: ${s.uncovered.map(printable).join(", ")}`);
  return lines.join("\n");
}
