/** serve: a restore point's disks as read-only NBD exports, until interrupted. */
import { readFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { DEFAULT_READ_AHEAD, serveRestorePoint } from "../engine/serve.js";
import type { NbdTlsOptions } from "../nbd/index.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes, parseSize } from "../util/sizes.js";
import { interruptSignal, output, parseCount, withRepo } from "./context.js";
import { findRestorePoint, INSTANT_HELP, JOURNAL_OPTION, pointId } from "./instant-ref.js";

interface ServeFlags {
  disk?: string;
  socket?: string;
  port?: number;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  bind: string;
  cacheSize: string;
  readAhead: number;
  journal?: string;
}

/** The TLS files, read; all three or none, and only with --port. */
function tlsOptions(opts: ServeFlags): NbdTlsOptions | undefined {
  const files = { cert: opts.tlsCert, key: opts.tlsKey, ca: opts.tlsCa };
  const given = Object.values(files).filter((f) => f !== undefined).length;
  if (opts.port === undefined) {
    if (given > 0)
      throw new StrataError(
        ErrorCode.USAGE,
        "--tls-cert, --tls-key and --tls-ca go with --port (a unix socket is owner-only)",
      );
    return undefined;
  }
  if (given !== 3) {
    throw new StrataError(
      ErrorCode.USAGE,
      "serving over TCP (--port) needs TLS: give --tls-cert, --tls-key and --tls-ca (clients must present a certificate signed by that CA), or serve on a unix socket (--socket)",
    );
  }
  const read = (flag: string, path: string) => {
    try {
      return readFileSync(path);
    } catch (err) {
      throw new StrataError(ErrorCode.USAGE, `cannot read ${flag} ${path}: ${(err as Error).message}`);
    }
  };
  return {
    cert: read("--tls-cert", files.cert!),
    key: read("--tls-key", files.key!),
    ca: read("--tls-ca", files.ca!),
  };
}

/** $STRATA_RUN_DIR or /run/strata (created owner-only), VM.sock. */
async function defaultSocket(vm: string): Promise<string> {
  const dir = process.env.STRATA_RUN_DIR ?? "/run/strata";
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return join(dir, `${vm}.sock`);
}

export function registerServeCommand(program: Command): void {
  program
    .command("serve")
    .description("export a restore point's disks read-only over NBD until interrupted")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots); VM@INSTANT with --journal")
    .option("--disk <name>", "only this disk (default: every disk, one export each)")
    .option(...JOURNAL_OPTION)
    .option(
      "--socket <path>",
      "listen on this unix socket, owner-only (default: $STRATA_RUN_DIR or /run/strata, VM.sock)",
    )
    .option("--port <n>", "listen on this TCP port (0 picks a free one); needs --tls-*", parseCount("--port"))
    .option("--bind <addr>", "address for --port", "127.0.0.1")
    .option("--tls-cert <file>", "--port: the server's certificate (PEM)")
    .option("--tls-key <file>", "--port: the server's private key (PEM)")
    .option(
      "--tls-ca <file>",
      "--port: CA certificate (PEM) that every client's certificate must be signed by",
    )
    .option("--cache-size <size>", "chunk cache per disk", "256M")
    .option("--read-ahead <chunks>", "chunks fetched ahead of sequential reads", parseCount("--read-ahead"))
    .addHelpText(
      "after",
      `
Each disk is an export named after it. Chunks are fetched on demand, verified and cached; a
damaged chunk fails the read (EIO), it never returns wrong data. All-zero regions are reported
as holes (base:allocation), so qemu-img and nbdcopy skip them. The repository is read-locked
while serving (forget and gc wait). SIGINT or SIGTERM stops the server and removes the socket.

The disks are served decrypted, so by default on a unix socket only its owner can use. Over TCP
(--port) Strata requires TLS (NBD_OPT_STARTTLS, as QEMU's NBD server with tls-creds) and a
client certificate signed by --tls-ca; plain TCP is refused.

${INSTANT_HELP}

Examples:
  strata serve web1/latest --socket /run/strata/web1.sock
  strata serve web1@-10m --journal /srv/journal/web1 --socket /run/strata/web1-10m.sock
  qemu-img convert -p -f raw 'nbd+unix:///root?socket=/run/strata/web1.sock' -O qcow2 root.qcow2
  strata serve web1/2026-11-22T01:02:03Z --disk root --port 10809 \
      --tls-cert server-cert.pem --tls-key server-key.pem --tls-ca ca-cert.pem
  qemu-img info --object tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=client \
      --image-opts driver=nbd,host=127.0.0.1,port=10809,export=root,tls-creds=tls0`,
    )
    .action(async (ref: string, opts: ServeFlags, cmd: Command) => {
      const out = output(cmd);
      if (opts.socket !== undefined && opts.port !== undefined)
        throw new StrataError(ErrorCode.USAGE, "give one of --socket PATH or --port N, not both");
      if (opts.port !== undefined && opts.port > 65535)
        throw new StrataError(ErrorCode.USAGE, `--port ${opts.port} is not a TCP port`);
      const tls = tlsOptions(opts);
      const cacheBytes = parseSize(opts.cacheSize);
      const signal = interruptSignal();
      await withRepo(cmd, async (repo) => {
        const lock = await repo.lock("read", `serve of ${ref}`);
        try {
          const found = await findRestorePoint(repo, ref, opts.journal, { cacheBytes });
          const snap = found.snap;
          const id = pointId(snap);
          try {
            const socket =
              opts.port !== undefined ? undefined : resolve(opts.socket ?? (await defaultSocket(snap.vm)));
            const running = await serveRestorePoint(repo, snap, {
              ...(opts.disk === undefined ? {} : { disks: [opts.disk] }),
              ...(tls === undefined ? {} : { tls }),
              listen: socket !== undefined ? { path: socket } : { port: opts.port!, host: opts.bind },
              cacheBytes,
              readAhead: opts.readAhead ?? DEFAULT_READ_AHEAD,
              onError: (err) => out.warn(`NBD connection: ${err.message}`),
            });
            try {
              const addr = running.address;
              // Over TCP always TLS: the NBD URI scheme for that is nbds:// (libnbd's nbdinfo, nbdcopy).
              const uri = (name: string) =>
                "path" in addr
                  ? `nbd+unix:///${name}?socket=${addr.path}`
                  : `nbds://${addr.host.includes(":") ? `[${addr.host}]` : addr.host}:${addr.port}/${name}`;
              const exports = running.exports.map((d) => ({ name: d.name, size: d.size, uri: uri(d.name) }));
              if (out.json) {
                process.stdout.write(
                  `${JSON.stringify({
                    type: "ready",
                    id,
                    exports,
                    ...("path" in addr ? { socket: addr.path } : { host: addr.host, port: addr.port }),
                  })}\n`,
                );
              } else {
                const first = exports[0]!;
                out.info(
                  [
                    `serving ${id} read-only over NBD:`,
                    ...exports.map((e) => `  ${e.name} (${formatBytes(e.size)}): ${e.uri}`),
                    "path" in addr
                      ? `for example: qemu-img convert -p -f raw '${first.uri}' -O qcow2 ${first.name}.qcow2`
                      : `for example: qemu-img convert -p --object tls-creds-x509,id=tls0,dir=DIR,endpoint=client --image-opts driver=nbd,host=${addr.host},port=${addr.port},export=${first.name},tls-creds=tls0 -O qcow2 ${first.name}.qcow2 (DIR holds ca-cert.pem, client-cert.pem, client-key.pem)`,
                    "stop with Ctrl-C (SIGINT) or SIGTERM",
                  ].join("\n"),
                );
              }
              if (!signal.aborted)
                await new Promise<void>((r) => signal.addEventListener("abort", () => r(), { once: true }));
            } finally {
              await running.close();
            }
            const stats = running.exports.map((d) => ({ name: d.name, ...d.source.stats() }));
            out.result({ type: "summary", id, exports: stats }, () =>
              stats
                .map(
                  (s) =>
                    `${s.name}: ${s.hits} cache hits, ${s.misses} fetches, ${s.readAheadFetches} read ahead, ` +
                    `${s.fetchErrors} failed; cache peak ${formatBytes(s.peakCachedBytes)} of ${formatBytes(s.cacheBytes)}`,
                )
                .join("\n"),
            );
          } finally {
            await found.release();
          }
        } finally {
          await lock.release();
        }
      });
    });
}
