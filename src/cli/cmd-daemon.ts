/** daemon: the backup service in the foreground; daemon --check: its configuration checked and summarized. */
import { resolve } from "node:path";
import type { Command } from "commander";
import { Catalog, DEFAULT_CATALOG } from "../catalog/catalog.js";
import type { VmSummary } from "../hypervisor/adapter.js";
import type { KeepPolicy } from "../repo/retention.js";
import { Api } from "../server/api.js";
import {
  checkConfigFile,
  type DaemonConfig,
  DEFAULT_CONFIG,
  invalidConfig,
  type JobLimits,
} from "../server/config.js";
import { type JobSpec, planJobs } from "../server/jobs.js";
import { listenApi } from "../server/listen.js";
import { Notifier } from "../server/notify.js";
import { createJobRunner } from "../server/runner.js";
import { nextDue, nextSlot } from "../server/schedule.js";
import { Daemon, reniceProcess } from "../server/service.js";
import { formatDuration } from "../util/durations.js";
import { printable } from "../util/names.js";
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
Type=simple or exec), logs to stdout (info) and stderr (warnings, errors), and stops on SIGTERM
or SIGINT, cancelling running jobs and recording them as cancelled. Every run is recorded in
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
and when each job runs next.

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
    io-weight: 50             # cgroup v2 io.weight, 1-10000
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
  const config = (() => {
    const checked = checkConfigFile(file);
    if (!checked.config) throw invalidConfig(file, checked.problems);
    return checked.config;
  })();
  const log = (level: string, message: string) =>
    (level === "warn" || level === "error" ? process.stderr : process.stdout).write(`${level}: ${message}\n`);
  if (config.limits.nice !== undefined) {
    const r = reniceProcess(config.limits.nice);
    if (r.refused) log("warn", `cannot set nice ${config.limits.nice} on the daemon's threads: ${r.refused}`);
  }
  const catalog = Catalog.open(resolve(config.catalog ?? process.env.STRATA_CATALOG ?? DEFAULT_CATALOG));
  const inventory = config.inventory ?? DEFAULT_INVENTORY;
  const registry = buildRegistry({ inventory });
  const stateDir = config.stateDir ?? defaultStateDir();
  const notifier = config.notifications && new Notifier(config.notifications, { log });
  const daemon = new Daemon({
    ...(notifier ? { notifier } : {}),
    config,
    catalog,
    runner: createJobRunner({
      registry,
      catalog,
      stateDir,
      ...(config.limits.bandwidth === undefined ? {} : { hostBandwidth: config.limits.bandwidth }),
    }),
    listVms: () => listHostVms({ inventory }),
    log,
  });
  let listening: Awaited<ReturnType<typeof listenApi>> | undefined;
  try {
    await new Promise<void>((done, fail) => {
      const stop = (sig: string) => {
        log("info", `${sig}: stopping`);
        daemon.stop(`the daemon received ${sig}`).then(done, fail);
      };
      process.once("SIGTERM", () => stop("SIGTERM"));
      process.once("SIGINT", () => stop("SIGINT"));
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
        listening = await listenApi(api, config.api, { stateDir, log });
        await daemon.start();
      })().catch(fail);
    });
    log("info", "stopped");
  } finally {
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
  verify?: { schedule: string; readData: boolean; nextRun: string };
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
      ...(p.verify === undefined
        ? {}
        : {
            verify: {
              schedule: p.verify.schedule.text,
              readData: p.verify.readData,
              nextRun: next(mine.find((j) => j.kind === "verify")),
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
  return {
    repositories: [...config.repositories.values()],
    limits: config.limits,
    policies,
    uncovered,
    warnings,
  };
}

function limitsText(
  l: JobLimits & { jobs?: number; jobsPerRepository?: number; bandwidth?: number },
): string {
  const parts: string[] = [];
  if (l.jobs !== undefined) parts.push(`${l.jobs} job(s) at once`);
  if (l.jobsPerRepository !== undefined) parts.push(`${l.jobsPerRepository} per repository`);
  if (l.bandwidth !== undefined) parts.push(`${l.bandwidth} MiB/s for all jobs`);
  if (l.jobBandwidth !== undefined) parts.push(`${l.jobBandwidth} MiB/s per job`);
  if (l.workerThreads !== undefined) parts.push(`${l.workerThreads} worker thread(s)`);
  if (l.nice !== undefined) parts.push(`nice ${l.nice}`);
  if (l.ioWeight !== undefined) parts.push(`io weight ${l.ioWeight}`);
  return parts.length > 0 ? parts.join(", ") : "none";
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
        `  ${r.name}  ${r.path}${r.passwordFile ? ` (password file ${r.passwordFile})` : " (not encrypted)"}`,
    ),
    `host limits: ${limitsText(s.limits)}`,
    `API: unix socket ${config.api.socket}${config.api.https ? `, HTTPS on ${config.api.https.host}:${config.api.https.port}${config.api.https.cert ? ` (certificate ${config.api.https.cert})` : " (self-signed certificate)"}` : ""}`,
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
    if (p.verify)
      lines.push(
        `  verify     ${p.verify.schedule}${p.verify.readData ? ", reading all data" : ", metadata"}; next ${p.verify.nextRun}`,
      );
    lines.push(`  limits     ${limitsText(p.limits)}`);
  }
  if (s.uncovered.length > 0)
    lines.push("", `VMs no policy covers: ${s.uncovered.map(printable).join(", ")}`);
  return lines.join("\n");
}
