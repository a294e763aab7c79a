// Helpers for tests of strata serve and the restore sinks: a backed-up image, a running serve.
import type { ChildProcess } from "node:child_process";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { promisify } from "node:util";
import { writeSyntheticImage } from "../../src/image/synthetic.js";
import { chunkDigest } from "../../src/repo/codec.js";
import { collect, startStrata, strataOk, summary } from "../helpers/cli.js";

const execFileP = promisify(execFile);

export const CHUNK = 64 * 1024;

/** Runs a program (30 s limit); resolves with its output whatever the exit code. */
export async function runTool(
  cmd: string,
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(cmd, args, { timeout: 30_000, maxBuffer: 64 * 1024 * 1024 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string; message: string };
    return {
      code: typeof e.code === "number" ? e.code : 1,
      stdout: e.stdout ?? "",
      stderr: e.stderr ?? e.message,
    };
  }
}

/** Like runTool but throws with the output when the program fails. */
export async function tool(cmd: string, args: string[]): Promise<string> {
  const r = await runTool(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.code}: ${r.stdout} ${r.stderr}`);
  return r.stdout;
}

export interface BackedUp {
  repo: string;
  image: string;
  id: string;
  size: number;
}

/** Writes a synthetic image, creates a 64 KiB-chunk repository and backs the image up as disk `name`. */
export async function backedUpImage(
  dir: string,
  options: { size: number; seed: string; holes?: number; name?: string; runSize?: number },
): Promise<BackedUp> {
  const repo = join(dir, "repo");
  const image = join(dir, `${options.name ?? "root"}.img`);
  await writeSyntheticImage(image, {
    size: options.size,
    seed: options.seed,
    holes: options.holes ?? 0.5,
    runSize: options.runSize ?? 256 * 1024,
  });
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const b = summary(
    await strataOk([
      "backup",
      "--repo",
      repo,
      "--vm",
      "vm1",
      "--json",
      `file:${image},name=${options.name ?? "root"}`,
    ]),
  );
  return { repo, image, id: b.id as string, size: options.size };
}

/** Which 64 KiB pieces of a file are all zero. */
export async function zeroChunks(path: string): Promise<boolean[]> {
  const data = await fs.readFile(path);
  const out: boolean[] = [];
  for (let off = 0; off < data.length; off += CHUNK) {
    const piece = data.subarray(off, Math.min(data.length, off + CHUNK));
    out.push(piece.every((b) => b === 0));
  }
  return out;
}

/**
 * Offset of the first 64 KiB piece of `path` whose chunk digest is `digest` (unencrypted
 * repositories, format v2: BLAKE3).
 */
export async function offsetOfDigest(path: string, digest: string): Promise<number> {
  const data = await fs.readFile(path);
  for (let off = 0; off < data.length; off += CHUNK) {
    const h = chunkDigest(
      data.subarray(off, Math.min(data.length, off + CHUNK)),
      undefined,
      "blake3",
    ).toString("hex");
    if (h === digest) return off;
  }
  throw new Error(`no piece of ${path} has digest ${digest}`);
}

export interface Served {
  child: ChildProcess;
  ready: {
    type: string;
    exports: Array<{ name: string; size: number; uri: string }>;
    socket?: string;
    port?: number;
  };
  /** SIGTERM, wait; the exit code and everything printed. */
  stop(): Promise<{ code: number | null; stdout: string; stderr: string }>;
}

/** Starts `strata serve --json ...args` and waits for its ready line; killed after the test if still running. */
export async function startServe(
  t: TestContext,
  args: string[],
  env?: Record<string, string | undefined>,
): Promise<Served> {
  const child = startStrata(["serve", "--json", ...args], env === undefined ? {} : { env });
  const out = collect(child);
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGKILL");
      await exited;
    }
  });
  const deadline = Date.now() + 15_000;
  for (;;) {
    const line = out.stdout.split("\n").find((l) => l.startsWith('{"type":"ready"'));
    if (line) {
      return {
        child,
        ready: JSON.parse(line) as Served["ready"],
        async stop() {
          child.kill("SIGTERM");
          const code = await exited;
          return { code, stdout: out.stdout, stderr: out.stderr };
        },
      };
    }
    if (child.exitCode !== null)
      throw new Error(`strata serve exited ${child.exitCode}: ${out.stdout} ${out.stderr}`);
    if (Date.now() > deadline) throw new Error(`strata serve not ready in time: ${out.stdout} ${out.stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The JSON summary a stopped serve printed last. */
export function serveSummary(stdout: string): {
  type: string;
  exports: Array<{ name: string } & Record<string, number>>;
} {
  const lines = stdout.trim().split("\n");
  return JSON.parse(lines[lines.length - 1]!);
}

export interface TlsFiles {
  /** The server's files: --tls-cert, --tls-key, --tls-ca. */
  serverArgs: string[];
  /** A client directory as QEMU's tls-creds-x509 (and libnbd's tls-certificates) want it. */
  client: string;
  /** The CA certificate alone: a client with no certificate of its own. */
  noCert: string;
  /** A client certificate signed by another CA. */
  otherCa: string;
}

/** A test CA, a server certificate for 127.0.0.1 and client certificates, made with openssl. */
export async function makeTlsFiles(dir: string): Promise<TlsFiles> {
  const key = (path: string) =>
    tool("openssl", [
      "genpkey",
      "-algorithm",
      "EC",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-out",
      path,
    ]);
  const ca = async (name: string) => {
    await key(join(dir, `${name}-key.pem`));
    await tool("openssl", [
      "req",
      "-x509",
      "-new",
      "-key",
      join(dir, `${name}-key.pem`),
      "-out",
      join(dir, `${name}-cert.pem`),
      "-days",
      "2",
      "-subj",
      `/CN=${name}`,
    ]);
  };
  const sign = async (name: string, caName: string, outDir: string, ext: string) => {
    const k = join(outDir, `${name}-key.pem`);
    await key(k);
    const csr = join(dir, `${name}-${caName}.csr`);
    await tool("openssl", ["req", "-new", "-key", k, "-out", csr, "-subj", `/CN=strata-test-${name}`]);
    const extFile = join(dir, `${name}-${caName}.ext`);
    await fs.writeFile(
      extFile,
      `${ext}\nkeyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n`,
    );
    await tool("openssl", [
      "x509",
      "-req",
      "-in",
      csr,
      "-CA",
      join(dir, `${caName}-cert.pem`),
      "-CAkey",
      join(dir, `${caName}-key.pem`),
      "-CAcreateserial",
      "-out",
      join(outDir, `${name}-cert.pem`),
      "-days",
      "2",
      "-extfile",
      extFile,
    ]);
  };
  await ca("ca");
  await ca("other-ca");
  await sign("server", "ca", dir, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth");
  const client = join(dir, "client");
  const noCert = join(dir, "no-cert");
  const otherCa = join(dir, "other-ca-client");
  for (const d of [client, noCert, otherCa]) {
    await fs.mkdir(d);
    await fs.copyFile(join(dir, "ca-cert.pem"), join(d, "ca-cert.pem"));
  }
  await sign("client", "ca", client, "extendedKeyUsage=clientAuth");
  await sign("client", "other-ca", otherCa, "extendedKeyUsage=clientAuth");
  return {
    serverArgs: [
      "--tls-cert",
      join(dir, "server-cert.pem"),
      "--tls-key",
      join(dir, "server-key.pem"),
      "--tls-ca",
      join(dir, "ca-cert.pem"),
    ],
    client,
    noCert,
    otherCa,
  };
}

/** qemu-img arguments that open `exportName` at 127.0.0.1:`port` over TLS with the client files in `dir`. */
export function qemuTlsArgs(dir: string, port: number, exportName: string): string[] {
  return [
    "--object",
    `tls-creds-x509,id=tls0,dir=${dir},endpoint=client`,
    "--image-opts",
    `driver=nbd,host=127.0.0.1,port=${port},export=${exportName},tls-creds=tls0`,
  ];
}
