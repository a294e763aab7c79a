/**
 * What dead runs left on a libvirt host, and what other tools keep there:
 *
 *  - state records of runs that are gone (a frozen or suspended guest, a backup job, a socket
 *    directory, a checkpoint never committed to a restore point): released with `fix`;
 *  - Strata checkpoints (`strata-<repo>-<time>`) beyond the newest of each repository on a domain
 *    (only the newest is ever built on): deleted with `fix`;
 *  - a backup job whose socket is in Strata's state directory while no live run owns it: ended;
 *  - other tools' checkpoints and backup jobs (virtnbdbackup, ...): reported with the dirty bytes
 *    their bitmaps hold, never touched.
 */
import { join } from "node:path";
import { describeError, ErrorCode, isStrataError } from "../../util/errors.js";
import { processAlive } from "../../util/process.js";
import type { Finding } from "../adapter.js";
import { checkpointNames, deleteCheckpoint, release } from "./backup.js";
import { LibvirtState, stateDirOf } from "./state.js";
import type { Virsh } from "./virsh.js";
import { kids, parseXml } from "./xml.js";

async function checkpointBytes(virsh: Virsh, domain: string, name: string): Promise<number | undefined> {
  try {
    const xml = await virsh.run(["checkpoint-dumpxml", domain, name, "--size", "--no-domain"]);
    const cp = parseXml(xml, "domaincheckpoint", "checkpoint XML");
    let n = 0;
    for (const d of kids(
      cp.children.find((c) => c.tag === "disks"),
      "disk",
    ))
      n += Number(d.attrs.size ?? 0) || 0;
    return n;
  } catch {
    return undefined;
  }
}

/** What is left on the host, or with `only` on that one domain. */
export async function findLeftovers(
  virsh: Virsh,
  stateDir: string,
  fix: boolean,
  only?: string,
): Promise<Finding[]> {
  const out: Finding[] = [];
  const live = new Set<string>();
  /** Domains with a record, and the checkpoints records name (never committed: not a base). */
  const recorded = new Set<string>();
  const pending = new Set<string>();
  for (const rec of await LibvirtState.all(stateDir)) {
    const vm = rec.data.domain;
    if (only !== undefined && vm !== only) continue;
    recorded.add(vm);
    for (const i of rec.items) if (i.kind === "checkpoint") pending.add(`${vm}/${i.name}`);
    if (rec.data.pid !== process.pid && processAlive(rec.data.pid)) {
      live.add(vm);
      out.push({ vm, owner: "strata", what: `a backup in progress (pid ${rec.data.pid})`, fixed: false });
      continue;
    }
    const what = rec.items.map((i) => ("name" in i ? `${i.kind} ${i.name}` : i.kind)).join(", ");
    let fixed = false;
    if (fix) {
      try {
        await release(virsh, rec, () => {}, false);
        fixed = true;
      } catch (err) {
        out.push({ vm, owner: "strata", what: `cleanup failed: ${describeError(err)}`, fixed: false });
      }
    }
    out.push({ vm, owner: "strata", what: `a dead run's state: ${what || "(empty record)"}`, fixed });
  }
  let domains: string[];
  try {
    domains = (await virsh.run(["list", "--all", "--name"]))
      .split("\n")
      .map((l) => l.trim())
      .filter((l) => l !== "" && (only === undefined || l === only));
  } catch (err) {
    if (isStrataError(err, ErrorCode.EXTERNAL)) return out;
    throw err;
  }
  const ourSockets = stateDirOf(stateDir);
  for (const vm of domains) {
    const names = (await virsh.run(["checkpoint-list", vm, "--name"]).catch(() => ""))
      .split("\n")
      .map((l) => l.trim())
      .filter(Boolean);
    const newest = new Map<string, string>();
    const isPending = (n: string) => pending.has(`${vm}/${n}`);
    for (const n of names.filter((x) => checkpointNames.isOurs(x) && !isPending(x)).sort())
      newest.set(n.slice(0, n.lastIndexOf("-") + 1), n);
    for (const n of names) {
      if (isPending(n)) continue; // reported (and released) with its run's record
      const bytes = await checkpointBytes(virsh, vm, n);
      const size = bytes === undefined ? {} : { bytes };
      if (!checkpointNames.isOurs(n)) {
        out.push({ vm, owner: "foreign", what: `checkpoint ${n}`, ...size, fixed: false });
        continue;
      }
      if (newest.get(n.slice(0, n.lastIndexOf("-") + 1)) === n) continue;
      let fixed = false;
      if (fix && !live.has(vm)) {
        fixed = await deleteCheckpoint(virsh, vm, n, () => {}).then(
          () => true,
          () => false,
        );
      }
      out.push({ vm, owner: "strata", what: `stray checkpoint ${n}`, ...size, fixed });
    }
    const job = await virsh.run(["domjobinfo", vm]).catch(() => "");
    if (!/Operation:\s+Backup/.test(job)) continue;
    const socket = await virsh
      .run(["backup-dumpxml", vm])
      .then((x) => /socket='([^']*)'/.exec(x)?.[1] ?? /socket="([^"]*)"/.exec(x)?.[1] ?? "")
      .catch(() => "");
    if (recorded.has(vm) && socket.startsWith(join(ourSockets, "/"))) continue; // its record covers it
    if (socket.startsWith(join(ourSockets, "/"))) {
      let fixed = false;
      if (fix)
        fixed = await virsh.run(["domjobabort", vm]).then(
          () => true,
          () => false,
        );
      out.push({ vm, owner: "strata", what: `backup job (socket ${socket}) of a dead run`, fixed });
    } else if (!socket.startsWith(join(ourSockets, "/"))) {
      out.push({
        vm,
        owner: "foreign",
        what: `backup job${socket ? ` (socket ${socket})` : ""}`,
        fixed: false,
      });
    }
  }
  return out;
}
