import { useEffect, useState } from "preact/hooks";
import { type Instant, post, type Run } from "./api";
import { RunProgress } from "./progress";
import { useCan } from "./session";
import { bytes, href, useGet } from "./util";

function Migrate({ vm, onDone }: { vm: Instant; onDone: () => void }) {
  const [target, setTarget] = useState("");
  const [format, setFormat] = useState("qcow2");
  const [limit, setLimit] = useState("");
  const [run, setRun] = useState<Run>();
  const [error, setError] = useState<string>();
  if (run)
    return (
      <span>
        migration: <RunProgress id={run.id} onEnd={onDone} />
      </span>
    );
  if (vm.phase !== "running") return null;
  return (
    <form
      class="inline-form"
      onSubmit={(e) => {
        e.preventDefault();
        post<Run>(`/instant/${encodeURIComponent(vm.name)}/migrate`, {
          target,
          format,
          ...(limit ? { limitMiBps: Number(limit) } : {}),
        }).then(setRun, (err: Error) => setError(err.message));
      }}
    >
      <input
        aria-label="production directory"
        placeholder="/var/lib/vms/…"
        required
        value={target}
        onInput={(e) => setTarget((e.target as HTMLInputElement).value)}
      />
      <select
        aria-label="format"
        value={format}
        onChange={(e) => setFormat((e.target as HTMLSelectElement).value)}
      >
        <option value="qcow2">qcow2</option>
        <option value="raw">raw</option>
      </select>
      <input
        aria-label="speed limit MiB/s"
        type="number"
        min="1"
        placeholder="MiB/s"
        value={limit}
        onInput={(e) => setLimit((e.target as HTMLInputElement).value)}
      />
      <button type="submit">Migrate</button>
      {error ? <span class="bad">{error}</span> : null}
    </form>
  );
}

/** #/instant: instantly recovered VMs, refreshed every few seconds; migrate and stop. */
export function InstantPage() {
  const list = useGet<Instant[]>("/instant");
  const can = useCan();
  const [error, setError] = useState<string>();
  const [discard, setDiscard] = useState(true);
  const [stopping, setStopping] = useState<string>();
  useEffect(() => {
    const t = setInterval(list.reload, 3000);
    return () => clearInterval(t);
  }, [list.reload]);
  return (
    <main>
      <h2>Instant recovery</h2>
      {list.error ? <p class="bad">{list.error.message}</p> : null}
      {error ? (
        <p class="bad" role="alert">
          {error}
        </p>
      ) : null}
      {list.data && list.data.length === 0 ? (
        <p data-testid="instant-empty">No VM runs from a restore point.</p>
      ) : null}
      {can("instant.manage") ? (
        <label>
          <input type="checkbox" checked={discard} onChange={() => setDiscard(!discard)} /> Stopping discards
          the overlays (the guest's writes since boot)
        </label>
      ) : null}
      <table class="list" data-testid="instant-table">
        <thead>
          <tr>
            <th>name</th>
            <th>restore point</th>
            <th>phase</th>
            <th>VM</th>
            <th>server</th>
            <th>disks</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {(list.data ?? []).map((v) => (
            <tr key={v.name} data-instant={v.name}>
              <td>{v.name}</td>
              <td>
                <a href={href("vm", v.restorePoint.split("/")[0]!)}>{v.restorePoint}</a>
              </td>
              <td>
                <span class="badge" data-testid="instant-phase">
                  {v.phase}
                </span>
              </td>
              <td>
                {v.vm.running ? (
                  <span class="badge good">running</span>
                ) : (
                  <span class="badge warn">stopped</span>
                )}{" "}
                {v.vm.where ?? ""}
              </td>
              <td>{v.serve.running ? "serving" : "–"}</td>
              <td>
                {v.disks.map((d) => (
                  <div key={d.name}>
                    {d.name} {bytes(d.size)}
                    {d.production ? ` → ${d.production}` : ""}
                  </div>
                ))}
              </td>
              <td>
                <span class="buttons">
                  {can("instant.manage") ? <Migrate vm={v} onDone={list.reload} /> : null}
                  {can("instant.manage") ? (
                    <button
                      type="button"
                      class="danger"
                      disabled={stopping === v.name}
                      onClick={() => {
                        setStopping(v.name);
                        post(`/instant/${encodeURIComponent(v.name)}/stop`, { discard }).then(
                          () => {
                            setStopping(undefined);
                            list.reload();
                          },
                          (e: Error) => {
                            setStopping(undefined);
                            setError(e.message);
                          },
                        );
                      }}
                    >
                      {stopping === v.name ? "Stopping…" : "Stop"}
                    </button>
                  ) : null}
                </span>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </main>
  );
}
