import { useState } from "preact/hooks";
import { download, type FilePage, type Layout, pointPath } from "./api";
import { bytes, href, useGet, when } from "./util";

const PAGE = 200;

/** The filesystems of a restore point's layout, as `fs` selections. */
function filesystems(layout: Layout): Array<{ fs: string; label: string }> {
  const out: Array<{ fs: string; label: string }> = [];
  for (const d of layout.disks)
    for (const p of d.partitions)
      if (p.filesystem)
        out.push({
          fs: p.number === 0 ? d.disk : `${d.disk}:${p.number}`,
          label: `${d.disk}${p.number === 0 ? "" : ` partition ${p.number}`}: ${p.filesystem}, ${bytes(p.size)}${p.label ? ` (${p.label})` : ""}`,
        });
  for (const vg of layout.volumeGroups)
    for (const lv of vg.lvs)
      if (lv.filesystem)
        out.push({ fs: lv.name, label: `LV ${lv.name}: ${lv.filesystem}, ${bytes(lv.size)}` });
  return out;
}

function parent(path: string): string {
  const p = path.replace(/\/+$/, "");
  const i = p.lastIndexOf("/");
  return i <= 0 ? "/" : p.slice(0, i);
}

/** One filesystem of a restore point: its folders a page at a time, downloads of files and folders. */
function Folder({ id, fs, path, go }: { id: string; fs: string; path: string; go: (path: string) => void }) {
  const [offset, setOffset] = useState(0);
  const { data, error } = useGet<FilePage>(
    `${pointPath(id)}/files?fs=${encodeURIComponent(fs)}&path=${encodeURIComponent(path)}&limit=${PAGE}&offset=${offset}`,
  );
  const [busy, setBusy] = useState<string>();
  const [failed, setFailed] = useState<string>();
  const get = (p: string, name: string) => {
    setBusy(p);
    download(
      `${pointPath(id)}/download?fs=${encodeURIComponent(fs)}&path=${encodeURIComponent(p)}`,
      name,
    ).then(
      () => setBusy(undefined),
      (e: Error) => {
        setBusy(undefined);
        setFailed(e.message);
      },
    );
  };
  const parts = path.split("/").filter(Boolean);
  return (
    <section aria-label="folder">
      <nav class="crumbs" aria-label="path">
        <button type="button" onClick={() => go("/")}>
          /
        </button>
        {parts.map((name, i) => (
          <button key={i} type="button" onClick={() => go(`/${parts.slice(0, i + 1).join("/")}`)}>
            {name}
          </button>
        ))}
        <button type="button" onClick={() => get(path, `${parts.at(-1) ?? id.split("/")[0]}.tar`)}>
          Download this folder (tar)
        </button>
      </nav>
      {error ? <p class="bad">{error.message}</p> : null}
      {failed ? (
        <p class="bad" role="alert">
          {failed}
        </p>
      ) : null}
      {busy ? <p aria-busy="true">Downloading {busy}…</p> : null}
      {data ? (
        <p>
          {data.filesystem} on {data.disk}: {data.total} entries
        </p>
      ) : null}
      {data && data.total > PAGE ? (
        <nav class="pager" aria-label="entry pages">
          <button type="button" disabled={offset === 0} onClick={() => setOffset(Math.max(0, offset - PAGE))}>
            ‹ previous
          </button>
          <span>
            {offset + 1}–{offset + data.entries.length} of {data.total}
          </span>
          <button
            type="button"
            disabled={data.nextOffset === null}
            onClick={() => setOffset(data.nextOffset ?? 0)}
          >
            next ›
          </button>
        </nav>
      ) : null}
      <table class="list" data-testid="file-table">
        <thead>
          <tr>
            <th>name</th>
            <th>kind</th>
            <th>size</th>
            <th>modified</th>
            <th>mode</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {path !== "/" ? (
            <tr>
              <td>
                <button type="button" class="link" onClick={() => go(parent(path))}>
                  ..
                </button>
              </td>
              <td colSpan={5} />
            </tr>
          ) : null}
          {(data?.entries ?? []).map((e) => (
            <tr key={e.path} data-path={e.path}>
              <td>
                {e.kind === "directory" ? (
                  <button type="button" class="link" onClick={() => go(e.path)}>
                    {e.name}/
                  </button>
                ) : (
                  <span>
                    {e.name}
                    {e.target ? ` → ${e.target}` : ""}
                  </span>
                )}
              </td>
              <td>{e.kind}</td>
              <td>{e.kind === "file" ? bytes(e.size) : ""}</td>
              <td>{when(e.mtime)}</td>
              <td>
                <code>{(e.mode & 0o7777).toString(8).padStart(4, "0")}</code>
              </td>
              <td>
                {e.kind === "file" || e.kind === "directory" ? (
                  <button
                    type="button"
                    aria-label={`Download ${e.name}`}
                    onClick={() => get(e.path, e.kind === "file" ? e.name : `${e.name}.tar`)}
                  >
                    {e.kind === "file" ? "Download" : "Download (tar)"}
                  </button>
                ) : null}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

/** #/browse/VM/TIME[/FS[/PATH…]]: pick a filesystem of the restore point, then walk it. */
export function BrowsePage({ vm, time, fs, path }: { vm: string; time: string; fs?: string; path: string }) {
  const id = `${vm}/${time}`;
  const layout = useGet<Layout>(`${pointPath(id)}/layout`);
  const found = layout.data ? filesystems(layout.data) : [];
  const chosen = fs ?? (found.length === 1 ? found[0]!.fs : undefined);
  const go = (p: string) => {
    location.hash = href("browse", vm, time, chosen!, ...p.split("/").filter(Boolean));
  };
  return (
    <main>
      <p>
        <a href={href("vm", vm)}>‹ {vm}</a>
      </p>
      <h2>
        Files of {vm} <small>restore point {when(time)}</small>
      </h2>
      {layout.error ? <p class="bad">{layout.error.message}</p> : null}
      {!layout.data && !layout.error ? <p aria-busy="true">Reading the disks…</p> : null}
      {layout.data ? (
        <ul class="inline" aria-label="filesystems">
          {found.map((f) => (
            <li key={f.fs}>
              <a href={href("browse", vm, time, f.fs)} aria-current={f.fs === chosen ? "true" : undefined}>
                {f.label}
              </a>
            </li>
          ))}
          {found.length === 0 ? <li>No filesystem found on the disks.</li> : null}
        </ul>
      ) : null}
      {layout.data?.warnings.map((w) => (
        <p key={w} class="warn">
          {w}
        </p>
      ))}
      {chosen ? <Folder key={`${chosen}:${path}`} id={id} fs={chosen} path={path} go={go} /> : null}
    </main>
  );
}
