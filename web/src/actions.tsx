import type { ComponentChildren } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { del, download, get, type Instant, pointPath, post, type RestorePoint, type Run } from "./api";
import { RunProgress } from "./progress";
import { useCan } from "./session";
import { href } from "./util";

/** A modal dialog (Escape closes it; focus stays inside while open). */
function Modal({
  title,
  onClose,
  children,
}: {
  title: string;
  onClose: () => void;
  children: ComponentChildren;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    ref.current?.showModal();
  }, []);
  return (
    <dialog ref={ref} aria-label={title} onClose={onClose}>
      <h3>{title}</h3>
      {children}
      <p>
        <button type="button" onClick={() => ref.current?.close()}>
          Close
        </button>
      </p>
    </dialog>
  );
}

function Field({ label, children }: { label: string; children: ComponentChildren }) {
  return (
    // biome-ignore lint/a11y/noLabelWithoutControl: the control is among the children
    <label class="field">
      <span>{label}</span>
      {children}
    </label>
  );
}

const value = (e: Event) => (e.target as HTMLInputElement).value;

function RestoreDialog({ point, onClose }: { point: RestorePoint; onClose: () => void }) {
  const [what, setWhat] = useState<"in-place" | "clone" | "disk">("in-place");
  const [name, setName] = useState(`${point.vm}-restored`);
  const [target, setTarget] = useState("");
  const [disk, setDisk] = useState("");
  const [format, setFormat] = useState("");
  const [start, setStart] = useState(false);
  const [force, setForce] = useState(false);
  const [run, setRun] = useState<Run>();
  const [error, setError] = useState<string>();
  const submit = (e: Event) => {
    e.preventDefault();
    const body = {
      ...(what === "clone" ? { name, target } : {}),
      ...(what === "disk" ? { disk, ...(target ? { target } : {}) } : {}),
      ...(format ? { format } : {}),
      ...(start && what !== "disk" ? { start: true } : {}),
      ...(force ? { force: true } : {}),
    };
    post<Run>(`${pointPath(point.id)}/restore`, body).then(setRun, (err: Error) => setError(err.message));
  };
  return (
    <Modal title={`Restore ${point.id}`} onClose={onClose}>
      {run ? (
        <p>
          Run <a href={href("run", String(run.id))}>{run.id}</a>: <RunProgress id={run.id} />
        </p>
      ) : (
        <form class="form" onSubmit={submit}>
          <fieldset>
            <legend>What</legend>
            {(
              [
                ["in-place", "The whole VM, in place"],
                ["clone", "The whole VM, as a clone with a new name"],
                ["disk", "One disk"],
              ] as const
            ).map(([v, label]) => (
              <label key={v}>
                <input type="radio" name="what" checked={what === v} onChange={() => setWhat(v)} /> {label}
              </label>
            ))}
          </fieldset>
          {what === "clone" ? (
            <Field label="Clone's name">
              <input required value={name} onInput={(e) => setName(value(e))} />
            </Field>
          ) : null}
          {what === "disk" ? (
            <Field label="Disk">
              <input required value={disk} placeholder="e.g. vda" onInput={(e) => setDisk(value(e))} />
            </Field>
          ) : null}
          {what !== "in-place" ? (
            <Field
              label={
                what === "clone" ? "Host directory for its disks" : "Host directory (default: its own path)"
              }
            >
              <input required={what === "clone"} value={target} onInput={(e) => setTarget(value(e))} />
            </Field>
          ) : null}
          <Field label="Format">
            <select value={format} onChange={(e) => setFormat(value(e))}>
              <option value="">as backed up</option>
              <option value="raw">raw</option>
              <option value="qcow2">qcow2</option>
            </select>
          </Field>
          {what !== "disk" ? (
            <label>
              <input type="checkbox" checked={start} onChange={() => setStart(!start)} /> Start the VM
              afterwards
            </label>
          ) : null}
          <label>
            <input type="checkbox" checked={force} onChange={() => setForce(!force)} /> Replace existing files
          </label>
          <button type="submit" class="primary">
            Restore
          </button>
          {error ? (
            <p class="bad" role="alert">
              {error}
            </p>
          ) : null}
        </form>
      )}
    </Modal>
  );
}

function ConfigDialog({ point, onClose }: { point: RestorePoint; onClose: () => void }) {
  const [text, setText] = useState<string>();
  const [error, setError] = useState<string>();
  useEffect(() => {
    get<unknown>(`${pointPath(point.id)}/config?as=json`).then(
      (c) => setText(JSON.stringify(c, null, 2)),
      (e: Error) => setError(e.message),
    );
  }, [point.id]);
  const save = (as: string, ext: string) =>
    download(`${pointPath(point.id)}/config?as=${as}`, `${point.vm}.${ext}`).catch((e: Error) =>
      setError(e.message),
    );
  return (
    <Modal title={`Configuration of ${point.id}`} onClose={onClose}>
      {error ? <p class="bad">{error}</p> : null}
      {text ? (
        <>
          <pre class="log" data-testid="vm-config">
            {text}
          </pre>
          <p class="buttons">
            Download as{" "}
            {(
              [
                ["json", "json", "JSON"],
                ["qemu-args", "txt", "QEMU command line"],
                ["xml", "xml", "libvirt XML"],
                ["pve", "conf", "Proxmox VE"],
              ] as const
            ).map(([as, ext, label]) => (
              <button key={as} type="button" onClick={() => save(as, ext)}>
                {label}
              </button>
            ))}
          </p>
        </>
      ) : null}
    </Modal>
  );
}

function InstantDialog({ point, onClose }: { point: RestorePoint; onClose: () => void }) {
  const [name, setName] = useState(`${point.vm}-instant`);
  const [target, setTarget] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();
  return (
    <Modal title={`Boot ${point.id} (instant recovery)`} onClose={onClose}>
      <form
        class="form"
        onSubmit={(e) => {
          e.preventDefault();
          setBusy(true);
          post<Instant>(`${pointPath(point.id)}/instant`, { name, ...(target ? { target } : {}) }).then(
            () => {
              location.hash = href("instant");
            },
            (err: Error) => {
              setBusy(false);
              setError(err.message);
            },
          );
        }}
      >
        <p>The VM runs from the restore point at once, its writes kept in local overlays.</p>
        <Field label="Name (a clone with a new UUID and MACs unless it is the VM's own)">
          <input required value={name} onInput={(e) => setName(value(e))} />
        </Field>
        <Field label="Host directory for overlays (default: the daemon's state dir)">
          <input value={target} onInput={(e) => setTarget(value(e))} />
        </Field>
        <button type="submit" class="primary" disabled={busy}>
          {busy ? "Booting…" : "Boot"}
        </button>
        {error ? (
          <p class="bad" role="alert">
            {error}
          </p>
        ) : null}
      </form>
    </Modal>
  );
}

/** The buttons of one restore point, those the role may use only. */
export function PointButtons({ point, onChange }: { point: RestorePoint; onChange: () => void }) {
  const can = useCan();
  const [open, setOpen] = useState<"restore" | "config" | "instant">();
  const [error, setError] = useState<string>();
  const [vm, time] = [point.vm, point.id.slice(point.vm.length + 1)];
  return (
    <>
      {can("files.read") ? (
        <>
          <a class="button" href={href("browse", vm, time)}>
            Browse files
          </a>
          <button type="button" onClick={() => setOpen("config")}>
            Configuration
          </button>
        </>
      ) : null}
      {can("restore.start") ? (
        <button type="button" onClick={() => setOpen("restore")}>
          Restore…
        </button>
      ) : null}
      {can("instant.manage") ? (
        <button type="button" onClick={() => setOpen("instant")}>
          Boot (instant)
        </button>
      ) : null}
      {can("forget.run") ? (
        <button
          type="button"
          class="danger"
          onClick={() => {
            if (confirm(`Forget restore point ${point.id}? gc then frees its space.`))
              del(pointPath(point.id)).then(onChange, (e: Error) => setError(e.message));
          }}
        >
          Forget
        </button>
      ) : null}
      {error ? <span class="bad">{error}</span> : null}
      {open === "restore" ? <RestoreDialog point={point} onClose={() => setOpen(undefined)} /> : null}
      {open === "config" ? <ConfigDialog point={point} onClose={() => setOpen(undefined)} /> : null}
      {open === "instant" ? <InstantDialog point={point} onClose={() => setOpen(undefined)} /> : null}
    </>
  );
}
