/**
 * A real libvirtd for tests, and the test guest as a libvirt domain (type 'qemu', TCG).
 *
 * libvirtd (Debian 12 has only the monolithic daemon) is started by hand when none answers on
 * qemu:///system — `virtlogd -d` then `libvirtd -d --pid-file` — and stopped again after the test
 * file by the PIDs it wrote; one that was already running is left alone. A private socket
 * directory is not possible for a root libvirtd's qemu driver (its state paths are fixed), so the
 * system one is used and every domain a test defines is named strata-test-*.
 */
import { execFile } from "node:child_process";
import { chmod, copyFile, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { promisify } from "node:util";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { processAlive, socketAccepts } from "../../src/util/process.js";
import { tempDir } from "./cli.js";
import { testGuest } from "./guest.js";
import { parseLatencySummaries } from "./records.js";

const run = promisify(execFile);
export const URI = "qemu:///system";

/** Runs virsh and returns stdout; throws with virsh's stderr. */
export async function virsh(...args: string[]): Promise<string> {
  try {
    return (await run("virsh", ["-c", URI, ...args], { maxBuffer: 16 * 1024 * 1024 })).stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`virsh ${args.join(" ")}: ${(e.stderr ?? e.message).trim()}`);
  }
}

/**
 * Test files run in parallel processes (and a developer may run two suites at once), and all of
 * them share the one system libvirtd. So starting and stopping it goes through a folder every
 * test process shares: a lock (mkdir is atomic), one file per process using libvirtd, and the
 * PID files of a libvirtd and virtlogd that tests started. The last user out stops what tests
 * started; a libvirtd that was running before any test is never stopped.
 */
const SHARED = "/run/strata-test-libvirtd";
const USERS = join(SHARED, "users");
const LOCK = join(SHARED, "lock");

async function underLock<T>(fn: () => Promise<T>): Promise<T> {
  await mkdir(USERS, { recursive: true });
  for (let i = 0; ; i++) {
    try {
      await mkdir(LOCK);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      // A holder killed mid-way leaves the lock: nothing here takes a minute.
      const st = await stat(LOCK).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs > 60_000) await rm(LOCK, { recursive: true, force: true });
      if (i > 2400) throw new Error(`${LOCK} is held for more than two minutes`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  try {
    return await fn();
  } finally {
    await rm(LOCK, { recursive: true, force: true });
  }
}

/** Processes still using libvirtd (their files), after dropping those of dead processes. */
async function liveUsers(): Promise<string[]> {
  const out: string[] = [];
  for (const name of await readdir(USERS)) {
    if (processAlive(Number(name))) out.push(name);
    else await rm(join(USERS, name), { force: true });
  }
  return out;
}

let using = false;

/**
 * Makes sure libvirtd answers, starting it (and virtlogd) when none does. Pair it with
 * `after(stopLibvirtd)` at the top of the describe block, so that it stops only after every
 * test's own cleanup (domains destroyed and undefined) has run.
 */
export async function ensureLibvirtd(): Promise<void> {
  await underLock(async () => {
    await writeFile(join(USERS, String(process.pid)), "");
    using = true;
    if (await socketAccepts("/run/libvirt/libvirt-sock")) return;
    if (!(await socketAccepts("/run/libvirt/virtlogd-sock")))
      await run("virtlogd", ["-d", "-p", join(SHARED, "virtlogd.pid")]);
    await run("libvirtd", ["-d", "--pid-file", join(SHARED, "libvirtd.pid")]);
    for (let i = 0; i < 100 && !(await socketAccepts("/run/libvirt/libvirt-sock")); i++)
      await new Promise((r) => setTimeout(r, 100));
  });
  await virsh("version");
}

/** Stops libvirtd and virtlogd when tests started them and no other test process still uses them. */
export async function stopLibvirtd(): Promise<void> {
  if (!using) return;
  using = false;
  await underLock(async () => {
    await rm(join(USERS, String(process.pid)), { force: true });
    if ((await liveUsers()).length > 0) return;
    for (const name of ["libvirtd.pid", "virtlogd.pid"]) {
      const file = join(SHARED, name);
      const pid = Number((await readFile(file, "utf8").catch(() => "")).trim());
      await rm(file, { force: true });
      if (!pid || !processAlive(pid)) continue;
      try {
        process.kill(pid, "SIGTERM");
      } catch {}
      for (let i = 0; i < 100 && processAlive(pid); i++) await new Promise((r) => setTimeout(r, 100));
    }
  });
}

export interface DomainDiskSpec {
  target: string;
  format: "qcow2" | "raw";
  size: string;
  ext4?: boolean;
  /** MiB of random data written at the start of the disk before the domain starts. */
  fillMiB?: number;
}

export interface TestDomain {
  name: string;
  dir: string;
  xml: string;
  files: Record<string, string>;
  console(): Promise<string>;
  seq(): Promise<number>;
  waitSeq(n: number, timeoutMs?: number): Promise<number>;
  /** Starts the domain and waits for the guest to be ready. */
  start(): Promise<void>;
  /** The QEMU process of the running domain. */
  pid(): Promise<number>;
}

/** The test guest's domain XML: direct kernel boot, serial console to a file, agent channel. */
export function domainXml(o: {
  name: string;
  dir: string;
  kernel: string;
  initrd: string;
  append: string;
  disks: Array<{ target: string; format: string; file: string }>;
  mac?: string;
  agent?: boolean;
}): string {
  return `<domain type='qemu'>
  <name>${o.name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${o.kernel}</kernel>
    <initrd>${o.initrd}</initrd>
    <cmdline>${o.append}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
${o.disks
  .map(
    (d) => `    <disk type='file' device='disk'>
      <driver name='qemu' type='${d.format}'/>
      <source file='${d.file}'/>
      <target dev='${d.target}' bus='virtio'/>
    </disk>`,
  )
  .join("\n")}
    <interface type='user'>
      <mac address='${o.mac ?? "52:54:00:5a:7a:01"}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='${join(o.dir, "console.log")}'/>
      <target port='0'/>
    </serial>
${o.agent === false ? "" : "    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n"}    <memballoon model='none'/>
  </devices>
</domain>
`;
}

export function consoleSeq(text: string): number {
  return parseLatencySummaries(text).at(-1)?.seq ?? 0;
}

/**
 * Defines (persistent) and starts the test guest as domain `name`, its disk images in a fresh
 * directory QEMU's user can reach; the workload writes every record to each of `workload`.
 * Removed after the test: destroyed, undefined with its checkpoints, files deleted.
 */
export async function testDomain(
  t: TestContext,
  o: {
    name: string;
    disks: DomainDiskSpec[];
    workload: string[];
    data?: string;
    rate?: number;
    wlsize?: string;
    agent?: boolean;
  },
): Promise<TestDomain> {
  const guest = await testGuest();
  const dir = await mkdtemp(join(tmpdir(), "strata-lv-"));
  await chmod(dir, 0o755);
  // libvirt chowns the kernel and initrd it boots (dynamic_ownership): give it copies.
  const kernel = join(dir, "kernel");
  const initrd = join(dir, "initrd");
  await copyFile(guest.kernel, kernel);
  await copyFile(guest.initrd, initrd);
  const files: Record<string, string> = {};
  for (const d of o.disks) {
    const file = join(dir, `${d.target}.${d.format}`);
    if (d.ext4) {
      const raw = `${file}.tmp`;
      await run("qemu-img", ["create", "-q", "-f", "raw", raw, d.size]);
      await run("mkfs.ext4", ["-q", "-F", raw]);
      await run("qemu-img", ["convert", "-f", "raw", "-O", d.format, raw, file]);
      await rm(raw);
    } else if (d.fillMiB) {
      const raw = `${file}.tmp`;
      await run("qemu-img", ["create", "-q", "-f", "raw", raw, d.size]);
      await run("dd", [
        "if=/dev/urandom",
        `of=${raw}`,
        "bs=1M",
        `count=${d.fillMiB}`,
        "conv=notrunc",
        "status=none",
      ]);
      await run("qemu-img", ["convert", "-f", "raw", "-O", d.format, raw, file]);
      await rm(raw);
    } else {
      await run("qemu-img", ["create", "-q", "-f", d.format, file, d.size]);
    }
    files[d.target] = file;
  }
  const append = [
    // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic.
    "console=ttyS0 quiet panic=-1 no_timer_check",
    `strata.workload=${o.workload.join(",")}`,
    `strata.rate=${o.rate ?? 100}`,
    "strata.report=20",
    ...(o.wlsize ? [`strata.wlsize=${o.wlsize}`] : []),
    ...(o.data ? [`strata.data=${o.data}`] : []),
  ].join(" ");
  const xml = domainXml({
    name: o.name,
    dir,
    kernel,
    initrd,
    append,
    disks: o.disks.map((d) => ({ target: d.target, format: d.format, file: files[d.target]! })),
    ...(o.agent === undefined ? {} : { agent: o.agent }),
  });
  const xmlFile = join(dir, "domain.xml");
  await import("node:fs/promises").then((f) => f.writeFile(xmlFile, xml));
  await removeDomain(o.name);
  await virsh("define", xmlFile);
  t.after(async () => {
    await removeDomain(o.name);
    await rm(dir, { recursive: true, force: true });
  });
  const consoleLog = join(dir, "console.log");
  const dom: TestDomain = {
    name: o.name,
    dir,
    xml,
    files,
    console: () => readFile(consoleLog, "utf8").catch(() => ""),
    seq: async () => consoleSeq(await dom.console()),
    async waitSeq(n, timeoutMs = 60_000) {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const s = await dom.seq();
        if (s >= n) return s;
        if (Date.now() > end) throw new Error(`workload of ${o.name} did not reach seq ${n} (at ${s})`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    async start() {
      await rm(consoleLog, { force: true });
      await virsh("start", o.name);
      const end = Date.now() + 90_000;
      while (!/STRATA-GUEST-READY/.test(await dom.console())) {
        if (Date.now() > end)
          throw new Error(`${o.name} did not boot:\n${(await dom.console()).slice(-2000)}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    },
    async pid() {
      return Number((await readFile(`/run/libvirt/qemu/${o.name}.pid`, "utf8")).trim());
    },
  };
  await dom.start();
  return dom;
}

/** Destroys and undefines a domain (with its checkpoints' metadata), if it exists. */
export async function removeDomain(name: string): Promise<void> {
  const list = await virsh("list", "--all", "--name");
  if (!list.split("\n").some((l) => l.trim() === name)) return;
  await virsh("destroy", name).catch(() => {});
  await virsh("undefine", name, "--checkpoints-metadata", "--nvram").catch(async () => {
    await virsh("undefine", name, "--checkpoints-metadata").catch(() => {});
  });
}

/** Names of a domain's checkpoints. */
export async function checkpoints(name: string): Promise<string[]> {
  return (await virsh("checkpoint-list", name, "--name"))
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean);
}

/** Whether libvirt has a job running on the domain. */
export async function jobType(name: string): Promise<string> {
  return /Job type:\s+(\S+)/.exec(await virsh("domjobinfo", name))?.[1] ?? "?";
}

export async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * A test directory QEMU's user (libvirt-qemu) can reach, since it opens sockets and scratch
 * files there by path; `state` is the state directory inside it, and `repo` a repository in it
 * (closed after the test).
 */
export async function libvirtWorkspace(
  t: TestContext,
): Promise<{ dir: string; state: string; repo: Repository }> {
  const dir = tempDir(t);
  await chmod(dir, 0o755);
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: 256 * 1024 });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  return { dir, state: join(dir, "state"), repo };
}
