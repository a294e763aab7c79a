import { useEffect, useState } from "preact/hooks";
import { followRun, type Run, type RunEvent } from "./api";
import { bytes, percent } from "./util";

export interface Followed {
  done: number;
  total: number;
  log: Array<{ time: number; level: string; message: string }>;
  end?: Run;
  error?: string;
}

/** A run's live state from its event stream. */
export function useRunEvents(id: number | undefined): Followed {
  const [s, setS] = useState<Followed>({ done: 0, total: 0, log: [] });
  useEffect(() => {
    if (id === undefined) return;
    setS({ done: 0, total: 0, log: [] });
    return followRun(
      id,
      (e: RunEvent) =>
        setS((p) =>
          e.type === "progress"
            ? { ...p, done: e.done, total: e.total }
            : e.type === "log"
              ? { ...p, log: [...p.log, e] }
              : { ...p, end: e.run, done: e.run.progressDone, total: e.run.progressTotal },
        ),
      (err) => setS((p) => ({ ...p, error: err.message })),
    );
  }, [id]);
  return s;
}

export function Bar({ done, total, label }: { done: number; total: number; label?: string }) {
  const pct = percent(done, total);
  return (
    <span class="bar" title={`${bytes(done)} of ${bytes(total)}`}>
      <progress max={100} value={pct} aria-label={label ?? "progress"} />
      <span class="pct" data-testid="progress-pct">
        {pct} %
      </span>
    </span>
  );
}

/** Live progress of a running run; shows its outcome when it ends. */
export function RunProgress({ id, onEnd }: { id: number; onEnd?: (run: Run) => void }) {
  const s = useRunEvents(id);
  useEffect(() => {
    if (s.end && onEnd) onEnd(s.end);
  }, [s.end]);
  if (s.error) return <span class="bad">{s.error}</span>;
  const ended = s.end;
  const done = ended && ended.outcome === "success" && s.total === 0 ? 1 : s.done;
  const total = ended && ended.outcome === "success" && s.total === 0 ? 1 : s.total;
  return (
    <span class="run-progress" data-run={id} data-outcome={ended?.outcome ?? "running"}>
      <Bar done={done} total={total} label={`run ${id}`} />
      {ended ? <Outcome outcome={ended.outcome} /> : null}
    </span>
  );
}

export function Outcome({ outcome }: { outcome: string }) {
  const cls =
    outcome === "success" ? "good" : outcome === "running" || outcome === "warning" ? "warn" : "bad";
  return <span class={`badge ${cls}`}>{outcome}</span>;
}
