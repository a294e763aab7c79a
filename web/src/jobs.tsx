import { useEffect, useState } from "preact/hooks";
import { type Job, post, type RetentionPreview, type Run } from "./api";
import { Pager } from "./dashboard";
import { Outcome, RunProgress } from "./progress";
import { runAction, useCan } from "./session";
import { href, useGet, when } from "./util";

const PAGE = 50;

/** Run now and cancel buttons of a job, as the role allows. */
export function JobButtons({ job, onChange }: { job: Job; onChange: () => void }) {
  const can = useCan();
  const [error, setError] = useState<string>();
  const act = (p: Promise<unknown>) =>
    p.then(
      () => {
        setError(undefined);
        onChange();
      },
      (e: Error) => setError(e.message),
    );
  return (
    <span class="buttons">
      {can(runAction(job.kind)) && !job.running ? (
        <button type="button" onClick={() => act(post(`/jobs/${job.id}/run`))}>
          Run now
        </button>
      ) : null}
      {can("jobs.cancel") && job.running ? (
        <button type="button" class="danger" onClick={() => act(post(`/runs/${job.running!.id}/cancel`))}>
          Cancel
        </button>
      ) : null}
      {error ? (
        <span class="bad" role="alert">
          {error}
        </span>
      ) : null}
    </span>
  );
}

export function JobRows({ jobs, reload }: { jobs: Job[]; reload: () => void }) {
  // The run each job had going while this page was open: its bar stays, with its outcome.
  const [followed, setFollowed] = useState<Record<number, number>>({});
  useEffect(() => {
    const running = jobs.filter((j) => j.running && followed[j.id] !== j.running.id);
    if (running.length)
      setFollowed((f) => ({ ...f, ...Object.fromEntries(running.map((j) => [j.id, j.running!.id])) }));
  }, [jobs]);
  return (
    <table class="list" data-testid="job-table">
      <thead>
        <tr>
          <th>policy</th>
          <th>VM</th>
          <th>kind</th>
          <th>schedule</th>
          <th>next due</th>
          <th>recent runs</th>
          <th>now</th>
          <th />
        </tr>
      </thead>
      <tbody>
        {jobs.map((j) => (
          <tr key={j.id} data-job={j.id}>
            <td>{j.policy}</td>
            <td>{j.vm ? <a href={href("vm", j.vm)}>{j.vm}</a> : "–"}</td>
            <td>{j.kind}</td>
            <td>{j.schedule ?? "–"}</td>
            <td>{when(j.nextDue)}</td>
            <td>
              {j.runs.map((r: Run) => (
                <a key={r.id} href={href("run", String(r.id))} title={`${r.trigger} ${when(r.startedAt)}`}>
                  <Outcome outcome={r.outcome} />
                </a>
              ))}
            </td>
            <td>
              {j.running || followed[j.id] !== undefined ? (
                <RunProgress id={j.running?.id ?? followed[j.id]!} onEnd={reload} />
              ) : j.queued ? (
                "queued"
              ) : null}
            </td>
            <td>
              <JobButtons job={j} onChange={reload} />
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function Preview({ policy }: { policy: string }) {
  const { data, error } = useGet<RetentionPreview>(
    `/policies/${encodeURIComponent(policy)}/retention-preview`,
  );
  if (error) return <p class="bad">{error.message}</p>;
  if (!data) return <p aria-busy="true">Asking the repository…</p>;
  return (
    <div class="preview" data-testid="retention-preview">
      <p>
        Retention{" "}
        {Object.entries(data.retention)
          .map(([k, v]) => `${k} ${v}`)
          .join(", ")}{" "}
        in repository {data.repository}:
      </p>
      <ul>
        {data.vms.map((v) => (
          <li key={v.vm}>
            <strong>{v.vm}</strong>: keeps {v.keep.length},{" "}
            {v.remove.length ? (
              <>
                would remove <span class="bad">{v.remove.length}</span>: {v.remove.join(", ")}
              </>
            ) : (
              "removes nothing"
            )}
          </li>
        ))}
      </ul>
    </div>
  );
}

export function JobsPage() {
  const jobs = useGet<Job[]>("/jobs?runs=5");
  const can = useCan();
  const [page, setPage] = useState(0);
  const [preview, setPreview] = useState<string>();
  const all = jobs.data ?? [];
  const policies = [...new Set(all.map((j) => j.policy))].sort();
  const pages = Math.max(1, Math.ceil(all.length / PAGE));
  return (
    <main>
      <h2>Policies and jobs</h2>
      {jobs.error ? <p class="bad">{jobs.error.message}</p> : null}
      {can("retention.preview") ? (
        <section class="card" aria-label="policies">
          <h3>Policies</h3>
          <ul class="inline">
            {policies.map((p) => (
              <li key={p}>
                {p}{" "}
                <button type="button" onClick={() => setPreview(preview === p ? undefined : p)}>
                  Retention preview
                </button>
              </li>
            ))}
          </ul>
          {preview ? <Preview policy={preview} /> : null}
        </section>
      ) : null}
      <Pager page={page} pages={pages} setPage={setPage} />
      <JobRows jobs={all.slice(page * PAGE, page * PAGE + PAGE)} reload={jobs.reload} />
    </main>
  );
}

export function RunPage({ id }: { id: number }) {
  const { data, error, reload } = useGet<
    Run & { log: Array<{ id: number; time: number; level: string; message: string }> }
  >(`/runs/${id}`);
  const can = useCan();
  if (error) return <main class="bad">{error.message}</main>;
  if (!data) return <main aria-busy="true">Loading…</main>;
  return (
    <main>
      <h2>
        Run {data.id} <Outcome outcome={data.outcome} />
      </h2>
      <p>
        {data.trigger}, started {when(data.startedAt)}
        {data.endedAt ? `, ended ${when(data.endedAt)}` : ""}
        {data.restorePoint ? `, made ${data.restorePoint}` : ""}
      </p>
      {data.error ? <p class="bad">{data.error}</p> : null}
      {data.outcome === "running" ? (
        <p>
          <RunProgress id={data.id} onEnd={reload} />{" "}
          {can("jobs.cancel") ? (
            <button type="button" class="danger" onClick={() => post(`/runs/${data.id}/cancel`).then(reload)}>
              Cancel
            </button>
          ) : null}
        </p>
      ) : null}
      <h3>Log</h3>
      <pre class="log" data-testid="run-log">
        {data.log.map((l) => `${new Date(l.time).toISOString()} ${l.level}: ${l.message}\n`).join("")}
      </pre>
    </main>
  );
}
