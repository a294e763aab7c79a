import { useMemo, useState } from "preact/hooks";
import type { Cdp, HistorySample, Job, Repository, Vm } from "./api";
import { UsageChart } from "./chart";
import { RunProgress } from "./progress";
import { bytes, duration, href, useGet, when } from "./util";

const PAGE = 50;

type Health = { rank: number; label: string; cls: string };

/** A VM's state for sorting (failures first) and its badge. */
export function health(vm: Vm): Health {
  if (vm.policies.length === 0) return { rank: 2, label: "no policy", cls: "warn" };
  if (vm.policies.some((p) => p.lastRun && ["failed", "interrupted"].includes(p.lastRun.outcome)))
    return { rank: 0, label: "last run failed", cls: "bad" };
  if (vm.policies.some((p) => !p.lastRestorePoint)) return { rank: 1, label: "never backed up", cls: "bad" };
  if (!vm.protected) return { rank: 1, label: "RPO missed", cls: "bad" };
  return { rank: 3, label: "protected", cls: "good" };
}

function RepositoryCard({ repo }: { repo: Repository }) {
  const { data, error } = useGet<{ samples: HistorySample[] }>(
    `/repositories/${encodeURIComponent(repo.name)}/history?days=365`,
  );
  const samples = data?.samples ?? [];
  const last = samples.at(-1);
  const week = samples.slice(-7);
  const spanDays =
    week.length > 1 ? (Date.parse(week.at(-1)!.day) - Date.parse(week[0]!.day)) / 86_400_000 + 1 : 1;
  const perDay = week.reduce((n, s) => n + s.addedBytes, 0) / spanDays;
  return (
    <section class="card repo" aria-label={`repository ${repo.name}`}>
      <h3>
        Repository {repo.name} <small>{repo.location}</small>
      </h3>
      {error ? <p class="bad">{error.message}</p> : null}
      <dl class="figures">
        <div>
          <dt>stored</dt>
          <dd data-testid="repo-stored">{bytes(last?.storedBytes ?? repo.storedBytes)}</dd>
        </div>
        <div>
          <dt>logical</dt>
          <dd>{bytes(last?.logicalBytes ?? 0)}</dd>
        </div>
        <div>
          <dt>dedup × compression</dt>
          <dd>{last?.ratio != null ? `${last.ratio.toFixed(2)} ×` : "–"}</dd>
        </div>
        <div>
          <dt>growth per day</dt>
          <dd>{samples.length ? bytes(Math.round(perDay)) : "–"}</dd>
        </div>
        <div>
          <dt>restore points</dt>
          <dd>{repo.restorePoints}</dd>
        </div>
      </dl>
      {samples.length ? <UsageChart samples={samples} label={`${repo.name}: usage over time`} /> : null}
    </section>
  );
}

export function Dashboard() {
  const vms = useGet<Vm[]>("/vms");
  const jobs = useGet<Job[]>("/jobs?runs=1");
  const repos = useGet<Repository[]>("/repositories");
  const [filter, setFilter] = useState("");
  const [page, setPage] = useState(0);
  const running = useMemo(() => {
    const m = new Map<string, Job>();
    for (const j of jobs.data ?? []) if (j.running) m.set(j.vm, j);
    return m;
  }, [jobs.data]);
  const sorted = useMemo(
    () =>
      (vms.data ?? [])
        .map((vm) => ({ vm, h: health(vm) }))
        .filter(({ vm }) => vm.name.includes(filter))
        .sort((a, b) => a.h.rank - b.h.rank || a.vm.name.localeCompare(b.vm.name)),
    [vms.data, filter],
  );
  const counts = useMemo(() => {
    const c = { bad: 0, warn: 0, good: 0 };
    for (const { h } of sorted) c[h.cls as keyof typeof c]++;
    return c;
  }, [sorted]);
  const pages = Math.max(1, Math.ceil(sorted.length / PAGE));
  const shown = sorted.slice(page * PAGE, page * PAGE + PAGE);
  return (
    <main>
      <h2>Dashboard</h2>
      <div class="repos">
        {repos.error ? <p class="bad">{repos.error.message}</p> : null}
        {(repos.data ?? []).map((r) => (
          <RepositoryCard key={r.name} repo={r} />
        ))}
      </div>
      <section aria-label="virtual machines">
        <h3>
          Virtual machines{" "}
          <small data-testid="vm-count">
            {vms.data
              ? `${sorted.length} VMs: ${counts.bad} at risk, ${counts.warn} unprotected, ${counts.good} protected`
              : ""}
          </small>
        </h3>
        {vms.error ? <p class="bad">{vms.error.message}</p> : null}
        {!vms.data && !vms.error ? <p aria-busy="true">Loading…</p> : null}
        <div class="toolbar">
          <label>
            Filter{" "}
            <input
              type="search"
              value={filter}
              onInput={(e) => {
                setFilter((e.target as HTMLInputElement).value);
                setPage(0);
              }}
            />
          </label>
          <Pager page={page} pages={pages} setPage={setPage} />
        </div>
        <table class="list" data-testid="vm-table">
          <thead>
            <tr>
              <th>VM</th>
              <th>protection</th>
              <th>last good restore point</th>
              <th>age / RPO</th>
              <th>policies</th>
              <th>state</th>
              <th>running</th>
            </tr>
          </thead>
          <tbody>
            {shown.map(({ vm, h }) => {
              const p = vm.policies.find((x) => x.lastRestorePoint) ?? vm.policies[0];
              const job = running.get(vm.name);
              return (
                <tr key={vm.name} data-vm={vm.name}>
                  <td>
                    <a href={href("vm", vm.name)}>{vm.name}</a>
                  </td>
                  <td>
                    <span class={`badge ${h.cls}`}>{h.label}</span>
                  </td>
                  <td>
                    {when(p?.lastRestorePoint?.time)}
                    {vm.cdp ? <CdpLine cdp={vm.cdp} /> : null}
                  </td>
                  <td>
                    {duration(p?.ageMs)} / {duration(p?.rpoMs)}
                  </td>
                  <td>{vm.policies.map((x) => x.policy).join(", ") || "–"}</td>
                  <td>{vm.state}</td>
                  <td>{job?.running ? <RunProgress id={job.running.id} /> : null}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
        <Pager page={page} pages={pages} setPage={setPage} />
      </section>
    </main>
  );
}

export function Pager({
  page,
  pages,
  setPage,
}: {
  page: number;
  pages: number;
  setPage: (n: number) => void;
}) {
  if (pages <= 1) return null;
  return (
    <nav class="pager" aria-label="pages">
      <button type="button" disabled={page === 0} onClick={() => setPage(page - 1)}>
        ‹ previous
      </button>
      <span>
        page {page + 1} of {pages}
      </span>
      <button type="button" disabled={page >= pages - 1} onClick={() => setPage(page + 1)}>
        next ›
      </button>
    </nav>
  );
}

/** A VM's continuous data protection in one line: its window (from–to) and lag, or its state. */
export function CdpLine({ cdp }: { cdp: Cdp }) {
  return (
    <div class="cdp" data-cdp={cdp.state}>
      {cdp.from && cdp.to ? (
        <>
          CDP {when(cdp.from)} – {when(cdp.to)}, lag {cdp.lagMs === null ? "–" : `${cdp.lagMs} ms`}
        </>
      ) : (
        <>CDP {cdp.state}</>
      )}
    </div>
  );
}
