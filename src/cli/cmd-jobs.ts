/** jobs, run: the daemon's jobs and recent runs, and starting jobs now, through its unix socket. */
import type { Command } from "commander";
import type { Job, Run } from "../catalog/catalog.js";
import { DEFAULT_CONFIG, DEFAULT_SOCKET } from "../server/config.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { printable } from "../util/names.js";
import { formatBytes } from "../util/sizes.js";
import { output, parseCount } from "./context.js";
import { daemonCall, daemonSocket, followRun } from "./daemon-client.js";

interface JobView extends Job {
  nextDue: string | null;
  running: Run | null;
  queued: boolean;
  runs: Run[];
}

interface RunNow {
  status: "started" | "queued" | "running";
  run?: Run;
  job?: Job;
}

const SOCKET_HELP = `the daemon's API socket (default: $STRATA_SOCKET, else api.socket of --config, $STRATA_CONFIG or ${DEFAULT_CONFIG}, else ${DEFAULT_SOCKET})`;

const iso = (ms: number | null) => (ms === null ? "-" : new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z"));

function runLine(r: Run): string {
  const parts = [`run ${r.id}`, r.outcome.padEnd(11), iso(r.startedAt), r.trigger];
  if (r.durationMs !== null) parts.push(`${(r.durationMs / 1000).toFixed(1)} s`);
  if (r.outcome === "running" && r.progressTotal > 0)
    parts.push(`${Math.floor((100 * r.progressDone) / r.progressTotal)}%`);
  if (r.bytesRead > 0) parts.push(`read ${formatBytes(r.bytesRead)}, new ${formatBytes(r.bytesNew)}`);
  if (r.restorePoint) parts.push(r.restorePoint);
  if (r.error) parts.push(`${r.errorCode}: ${r.error}`);
  return parts.join("  ");
}

function renderJobs(jobs: JobView[]): string {
  if (jobs.length === 0) return "no jobs: the daemon's configuration covers no VM found now";
  const lines = [
    `${"ID".padEnd(5)} ${"POLICY".padEnd(14)} ${"VM".padEnd(18)} ${"KIND".padEnd(10)} ${"SCHEDULE".padEnd(16)} NEXT`,
  ];
  for (const j of jobs) {
    const next = j.running
      ? "running now"
      : j.queued
        ? "queued"
        : (j.nextDue?.replace(/\.\d{3}Z$/, "Z") ?? "after each backup");
    lines.push(
      `${String(j.id).padEnd(5)} ${printable(j.policy).padEnd(14)} ${printable(j.vm || "-").padEnd(18)} ${j.kind.padEnd(10)} ${(j.schedule ?? "-").padEnd(16)} ${next}`,
    );
    for (const r of j.runs) lines.push(`      ${runLine(r)}`);
  }
  return lines.join("\n");
}

export function registerJobsCommands(program: Command): void {
  program
    .command("jobs")
    .description("the daemon's jobs, when each runs next, and their recent runs")
    .option("--socket <path>", SOCKET_HELP)
    .option("--config <file>", "the daemon's configuration, to find its socket")
    .option("--runs <n>", "recent runs shown per job", parseCount("--runs"), 3)
    .addHelpText(
      "after",
      `
Asks the running daemon over its unix socket (strata daemon must run; this command says so
when it does not). Each job is a policy's backup of one VM, the retention run after each backup,
or the policy's verification; under each, its latest runs: outcome, start, trigger (schedule,
missed, manual, rerun), duration, bytes read and new, the restore point made, or the error.

Examples:
  strata jobs
  strata jobs --runs 10 --json`,
    )
    .action(async (opts: { socket?: string; config?: string; runs: number }, cmd: Command) => {
      const out = output(cmd);
      const socket = daemonSocket(opts);
      const { body } = await daemonCall<JobView[]>(
        socket,
        "GET",
        `/api/v1/jobs?runs=${Math.min(opts.runs, 100)}`,
      );
      out.result(body, () => renderJobs(body));
    });

  program
    .command("run")
    .description("start a policy's or a VM's jobs now, in the running daemon")
    .argument("<target>", "a policy name (all its VMs) or a VM name (every policy that backs it up)")
    .option("--kind <kind>", "which jobs: backup or verify", "backup")
    .option("--wait", "follow the runs to their end, with progress, and fail when one fails")
    .option("--socket <path>", SOCKET_HELP)
    .option("--config <file>", "the daemon's configuration, to find its socket")
    .addHelpText(
      "after",
      `
The daemon starts each job at once when its limits allow (jobs at once, per repository), else
queues it; a job already running is not started twice. Each run is recorded as "manual" and
shows in "strata jobs". A backup that succeeds is followed by its policy's retention, as on
schedule. Without the daemon, back up by hand with "strata backup".

Examples:
  strata run web            # every VM of policy web
  strata run db1 --wait     # db1 in each policy that backs it up, followed to the end
  strata run web --kind verify`,
    )
    .action(
      async (
        target: string,
        opts: { kind: string; wait?: boolean; socket?: string; config?: string },
        cmd: Command,
      ) => {
        const out = output(cmd);
        if (opts.kind !== "backup" && opts.kind !== "verify")
          throw new StrataError(ErrorCode.USAGE, `--kind must be backup or verify, not "${opts.kind}"`);
        const socket = daemonSocket(opts);
        const { body: jobs } = await daemonCall<JobView[]>(socket, "GET", "/api/v1/jobs?runs=0");
        const byPolicy = jobs.filter((j) => j.policy === target && j.kind === opts.kind);
        const chosen =
          byPolicy.length > 0 ? byPolicy : jobs.filter((j) => j.vm === target && j.kind === opts.kind);
        if (chosen.length === 0) {
          const policies = [...new Set(jobs.map((j) => j.policy))];
          const vms = [...new Set(jobs.filter((j) => j.vm !== "").map((j) => j.vm))];
          throw new StrataError(
            ErrorCode.USAGE,
            `no ${opts.kind} job of a policy or VM named "${target}" in the daemon (policies: ${policies.join(", ") || "none"}; VMs: ${vms.join(", ") || "none"})`,
          );
        }
        const started: Array<{ job: JobView; result: RunNow }> = [];
        for (const job of chosen) {
          const { body } = await daemonCall<RunNow>(socket, "POST", `/api/v1/jobs/${job.id}/run`);
          started.push({ job, result: body });
          const name = `${job.policy}/${job.vm || "-"}/${job.kind}`;
          if (!out.json)
            out.info(
              body.status === "started"
                ? `${name}: started run ${body.run!.id}`
                : body.status === "running"
                  ? `${name}: already running (run ${body.run!.id})`
                  : `${name}: queued behind the daemon's limits`,
            );
        }
        if (opts.wait !== true) {
          out.result(
            started.map((s) => ({ job: s.job.id, ...s.result })),
            () => "",
          );
          return;
        }
        const progress = out.progress();
        const ends = await Promise.all(
          started.map(async ({ job, result }) => {
            let runId = result.run?.id;
            while (runId === undefined) {
              // Queued: wait for the daemon to start it.
              await new Promise((r) => setTimeout(r, 1000));
              const { body } = await daemonCall<JobView[]>(socket, "GET", "/api/v1/jobs?runs=1");
              const j = body.find((x) => x.id === job.id);
              runId = j?.running?.id ?? (j?.queued ? undefined : j?.runs[0]?.id);
            }
            const name = `${job.vm || job.policy} (run ${runId})`;
            const end = await followRun(socket, runId, (type, data) => {
              if (type === "progress")
                progress.emit({
                  type: "progress",
                  job: name,
                  done: Number(data.done),
                  total: Number(data.total),
                });
              else if (type === "log" && data.level !== "info") out.warn(`${name}: ${String(data.message)}`);
            });
            progress.emit({ type: "end", job: name });
            return end.run as Run;
          }),
        );
        out.result(ends, () => ends.map((r) => runLine(r)).join("\n"));
        const bad = ends.filter((r) => r.outcome !== "success" && r.outcome !== "warning");
        if (bad.length > 0) {
          const first = bad[0]!;
          const code = Object.values(ErrorCode).includes(first.errorCode as ErrorCode)
            ? (first.errorCode as ErrorCode)
            : ErrorCode.EXTERNAL;
          throw new StrataError(
            code,
            `${bad.length} of ${ends.length} run(s) did not succeed; run ${first.id}: ${first.outcome}: ${first.error}`,
          );
        }
      },
    );
}
