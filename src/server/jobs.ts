/**
 * From configuration to jobs: each policy makes, for every VM it covers, a backup job on the
 * policy's schedule, a retention job (run after each backup, so unscheduled) and, with
 * `verify.boot`, a boot-verify job of its newest restore point; and one
 * verify job for the policy's repository on the verification schedule. {@link syncJobs} makes
 * the catalog's jobs exactly these, keeping the runs of jobs that come and go.
 */
import type { Catalog, Job } from "../catalog/catalog.js";
import type { JobKind } from "../catalog/schema.js";
import type { VmSummary } from "../hypervisor/adapter.js";
import { type DaemonConfig, selectVms } from "./config.js";
import { jobKey, type Timed } from "./schedule.js";

export interface JobSpec {
  policy: string;
  /** '' for the verify job, which covers the policy's repository. */
  vm: string;
  kind: JobKind;
  repository: string;
  /** When it runs by itself; undefined for jobs another job's run starts (retention). */
  timed?: Timed;
}

/** The jobs `config` makes for the VMs found now, policy by policy in the file's order. */
export function planJobs(
  config: DaemonConfig,
  vms: ReadonlyArray<Pick<VmSummary, "name" | "tags">>,
): JobSpec[] {
  const out: JobSpec[] = [];
  for (const p of config.policies.values()) {
    const base = { policy: p.name, repository: p.repository };
    for (const vm of selectVms(p.vms, vms)) {
      const key = jobKey({ policy: p.name, vm: vm.name, kind: "backup" });
      out.push({
        ...base,
        vm: vm.name,
        kind: "backup",
        timed: { key, schedule: p.schedule, jitterMs: p.jitterMs },
      });
      if (p.retention) out.push({ ...base, vm: vm.name, kind: "retention" });
      if (p.verify?.boot) {
        const bootKey = jobKey({ policy: p.name, vm: vm.name, kind: "boot-verify" });
        out.push({
          ...base,
          vm: vm.name,
          kind: "boot-verify",
          timed: { key: bootKey, schedule: p.verify.boot.schedule, jitterMs: p.jitterMs },
        });
      }
    }
    if (p.verify) {
      const key = jobKey({ policy: p.name, vm: "", kind: "verify" });
      out.push({
        ...base,
        vm: "",
        kind: "verify",
        timed: { key, schedule: p.verify.schedule, jitterMs: p.jitterMs },
      });
    }
  }
  return out;
}

/**
 * Makes the catalog's jobs those of `specs`: new ones are created, changed ones updated, and
 * jobs no longer planned marked removed (their runs stay). Returns each spec with its job.
 */
export function syncJobs(catalog: Catalog, specs: readonly JobSpec[]): Array<{ job: Job; spec: JobSpec }> {
  const out = specs.map((spec) => ({
    spec,
    job: catalog.ensureJob({
      policy: spec.policy,
      vm: spec.vm,
      kind: spec.kind,
      repository: spec.repository,
      schedule: spec.timed?.schedule.text ?? null,
    }),
  }));
  catalog.retireJobsExcept(out.map((o) => o.job.id));
  return out;
}
