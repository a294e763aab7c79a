import type { ComponentChildren } from "preact";
import { useMemo, useState } from "preact/hooks";
import type { Cdp, Job, Page, RestorePoint, Vm } from "./api";
import { health } from "./dashboard";
import { JobRows } from "./jobs";
import { bytes, duration, href, useGet, when } from "./util";

const PAGE = 50;

/** Marks of restore points along their time span; colour by consistency level. */
function Timeline({ points, selected }: { points: RestorePoint[]; selected?: string }) {
  if (points.length === 0) return null;
  const times = points.map((p) => Date.parse(p.time));
  const lo = Math.min(...times);
  const hi = Math.max(...times);
  const span = Math.max(1, hi - lo);
  const W = 1000;
  return (
    <svg
      class="timeline"
      viewBox={`0 0 ${W} 48`}
      preserveAspectRatio="none"
      role="img"
      aria-label="restore points over time"
    >
      <line x1="0" y1="24" x2={W} y2="24" class="axis" />
      {points.map((p, i) => {
        const x = points.length === 1 ? W / 2 : 8 + ((times[i]! - lo) / span) * (W - 16);
        return (
          <rect
            key={p.id}
            x={x - 3}
            y={p.id === selected ? 4 : 10}
            width={6}
            height={p.id === selected ? 40 : 28}
            class={`mark ${p.consistency}`}
          >
            <title>
              {when(p.time)}: {p.consistency}, {bytes(p.size)}, {bytes(p.bytesStored)} stored
            </title>
          </rect>
        );
      })}
      <text x="4" y="46" class="tick">
        {new Date(lo).toLocaleDateString()}
      </text>
      <text x={W - 4} y="46" class="tick" text-anchor="end">
        {new Date(hi).toLocaleDateString()}
      </text>
    </svg>
  );
}

/**
 * The continuous data protection window under the timeline: a bar from its first to its newest
 * restorable instant with its marks, then the same as text (the marks a list, for keyboards and
 * screen readers).
 */
function CdpWindow({ cdp }: { cdp: Cdp }) {
  const lo = cdp.from ? Date.parse(cdp.from) : undefined;
  const hi = cdp.to ? Date.parse(cdp.to) : undefined;
  const W = 1000;
  const x = (t: string) =>
    lo === undefined || hi === undefined ? 0 : 8 + ((Date.parse(t) - lo) / Math.max(1, hi - lo)) * (W - 16);
  return (
    <section class="cdp-window" aria-label="continuous data protection" data-cdp-window={cdp.state}>
      {lo !== undefined && hi !== undefined ? (
        <svg class="timeline" viewBox={`0 0 ${W} 24`} preserveAspectRatio="none" aria-hidden="true">
          <rect x="8" y="6" width={W - 16} height="12" class="cdp-bar" />
          {cdp.gaps.map((g) => (
            <rect
              key={g.from}
              x={x(g.from)}
              y="6"
              width={Math.max(2, x(g.to ?? cdp.to!) - x(g.from))}
              height="12"
              class="cdp-gap"
            />
          ))}
          {cdp.marks.map((m) => (
            <rect key={m.name} x={x(m.time) - 2} y="0" width="4" height="24" class="cdp-mark" />
          ))}
        </svg>
      ) : null}
      <p>
        CDP window{" "}
        {cdp.from && cdp.to ? (
          <>
            {when(cdp.from)} – {when(cdp.to)} ({duration(Date.parse(cdp.to) - Date.parse(cdp.from))})
          </>
        ) : (
          "none yet"
        )}
        ; protect {cdp.state}
        {cdp.pid === null ? "" : ` (pid ${cdp.pid})`}, journal {bytes(cdp.journalBytes)}, lag{" "}
        {cdp.lagMs === null ? "–" : `${cdp.lagMs} ms`}
        {cdp.lastExit ? `; last exit: ${cdp.lastExit}` : ""}
      </p>
      {cdp.gaps.length > 0 ? (
        <ul class="cdp-gaps" aria-label="gaps">
          {cdp.gaps.map((g) => (
            <li key={g.from}>
              gap {when(g.from)} – {g.to ? when(g.to) : "resuming"}: protection was down, instants inside
              cannot be restored
            </li>
          ))}
        </ul>
      ) : null}
      {cdp.marks.length > 0 ? (
        <ul class="cdp-marks" aria-label="marks">
          {cdp.marks.map((m) => (
            <li key={m.name}>
              mark <strong>{m.name}</strong> {when(m.time)}
            </li>
          ))}
        </ul>
      ) : null}
    </section>
  );
}

/** A restore point's actions; filled in by the restore flows for roles that may use them. */
export type PointActions = (point: RestorePoint) => ComponentChildren;

export function VmPage({ name, actions }: { name: string; actions?: PointActions }) {
  const vms = useGet<Vm[]>("/vms");
  const [offset, setOffset] = useState(0);
  const points = useGet<Page<RestorePoint>>(
    `/vms/${encodeURIComponent(name)}/restore-points?limit=${PAGE}&offset=${offset}`,
  );
  const jobs = useGet<Job[]>("/jobs?runs=10");
  const vm = vms.data?.find((v) => v.name === name);
  const mine = useMemo(() => (jobs.data ?? []).filter((j) => j.vm === name), [jobs.data, name]);
  const [selected, setSelected] = useState<string>();
  const page = points.data;
  return (
    <main>
      <p>
        <a href="#/">‹ dashboard</a>
      </p>
      <h2>
        VM {name} {vm ? <span class={`badge ${health(vm).cls}`}>{health(vm).label}</span> : null}
      </h2>
      {vms.error ? <p class="bad">{vms.error.message}</p> : null}
      {vm ? (
        <dl class="figures">
          <div>
            <dt>adapter</dt>
            <dd>{vm.adapter ?? "–"}</dd>
          </div>
          <div>
            <dt>state</dt>
            <dd>{vm.state}</dd>
          </div>
          <div>
            <dt>sources</dt>
            <dd>{vm.sources.join(", ") || "–"}</dd>
          </div>
          {vm.policies.map((p) => (
            <div key={p.policy}>
              <dt>policy {p.policy}</dt>
              <dd>
                {p.schedule} → {p.repository}; age {duration(p.ageMs)} of RPO {duration(p.rpoMs)}{" "}
                {p.rpoMet ? <span class="badge good">met</span> : <span class="badge bad">missed</span>}
              </dd>
            </div>
          ))}
        </dl>
      ) : null}
      <section aria-label="restore points">
        <h3>
          Restore points <small>{page ? `${page.total} in all` : ""}</small>
        </h3>
        {points.error ? <p class="bad">{points.error.message}</p> : null}
        {page ? <Timeline points={page.items} {...(selected ? { selected } : {})} /> : null}
        {vm?.cdp ? <CdpWindow cdp={vm.cdp} /> : null}
        {page && page.total > PAGE ? (
          <nav class="pager" aria-label="restore point pages">
            <button
              type="button"
              disabled={offset === 0}
              onClick={() => setOffset(Math.max(0, offset - PAGE))}
            >
              ‹ newer
            </button>
            <span>
              {offset + 1}–{offset + page.items.length} of {page.total}
            </span>
            <button
              type="button"
              disabled={page.nextOffset === null}
              onClick={() => setOffset(page.nextOffset ?? offset)}
            >
              older ›
            </button>
          </nav>
        ) : null}
        <table class="list" data-testid="point-table">
          <thead>
            <tr>
              <th>time</th>
              <th>consistency</th>
              <th>mode</th>
              <th>disks</th>
              <th>size</th>
              <th>added</th>
              <th>took</th>
              <th>run</th>
              <th />
            </tr>
          </thead>
          <tbody>
            {(page?.items ?? []).map((p) => (
              <tr
                key={p.id}
                data-point={p.id}
                class={p.id === selected ? "selected" : undefined}
                onFocusCapture={() => setSelected(p.id)}
                onMouseEnter={() => setSelected(p.id)}
              >
                <td>{when(p.time)}</td>
                <td>
                  <span class={`badge ${p.consistency.startsWith("crash") ? "warn" : "good"}`}>
                    {p.consistency}
                  </span>
                </td>
                <td>{p.mode}</td>
                <td>{p.disks}</td>
                <td>{bytes(p.size)}</td>
                <td>{bytes(p.bytesStored)}</td>
                <td>{duration(p.durationMs)}</td>
                <td>{p.runId !== null ? <a href={href("run", String(p.runId))}>{p.runId}</a> : "–"}</td>
                <td>
                  <span class="buttons">{actions ? actions(p) : null}</span>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </section>
      <section aria-label="jobs">
        <h3>Jobs and their runs</h3>
        {jobs.error ? <p class="bad">{jobs.error.message}</p> : null}
        <JobRows jobs={mine} reload={jobs.reload} />
      </section>
    </main>
  );
}
