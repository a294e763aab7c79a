/** serve: a restore point's disks as read-only NBD exports, until interrupted. */
import { resolve } from "node:path";
import type { Command } from "commander";
import { DEFAULT_READ_AHEAD, serveRestorePoint } from "../engine/serve.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes, parseSize } from "../util/sizes.js";
import { interruptSignal, output, parseCount, withRepo } from "./context.js";

interface ServeFlags {
  disk?: string;
  socket?: string;
  port?: number;
  bind: string;
  cacheSize: string;
  readAhead: number;
}

export function registerServeCommand(program: Command): void {
  program
    .command("serve")
    .description("export a restore point's disks read-only over NBD until interrupted")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots)")
    .option("--disk <name>", "only this disk (default: every disk, one export each)")
    .option("--socket <path>", "listen on this unix socket")
    .option("--port <n>", "listen on this TCP port (0 picks a free one)", parseCount("--port"))
    .option("--bind <addr>", "address for --port", "127.0.0.1")
    .option("--cache-size <size>", "chunk cache per disk", "256M")
    .option("--read-ahead <chunks>", "chunks fetched ahead of sequential reads", parseCount("--read-ahead"))
    .addHelpText(
      "after",
      `
Each disk is an export named after it. Chunks are fetched on demand, verified and cached; a
damaged chunk fails the read (EIO), it never returns wrong data. All-zero regions are reported
as holes (base:allocation), so qemu-img and nbdcopy skip them. The repository is read-locked
while serving (forget and gc wait). SIGINT or SIGTERM stops the server and removes the socket.

Examples:
  strata serve web1/latest --socket /run/strata/web1.sock
  qemu-img convert -p -f raw 'nbd+unix:///root?socket=/run/strata/web1.sock' -O qcow2 root.qcow2
  strata serve web1/2026-11-22T01:02:03Z --disk root --port 10809
  nbdinfo --map nbd://127.0.0.1:10809/root`,
    )
    .action(async (ref: string, opts: ServeFlags, cmd: Command) => {
      const out = output(cmd);
      if ((opts.socket === undefined) === (opts.port === undefined))
        throw new StrataError(ErrorCode.USAGE, "give exactly one of --socket PATH or --port N");
      if (opts.port !== undefined && opts.port > 65535)
        throw new StrataError(ErrorCode.USAGE, `--port ${opts.port} is not a TCP port`);
      const cacheBytes = parseSize(opts.cacheSize);
      const signal = interruptSignal();
      await withRepo(cmd, async (repo) => {
        const lock = await repo.lock("read", `serve of ${ref}`);
        try {
          const snap = await repo.findSnapshot(ref);
          const socket = opts.socket === undefined ? undefined : resolve(opts.socket);
          const running = await serveRestorePoint(repo, snap, {
            ...(opts.disk === undefined ? {} : { disks: [opts.disk] }),
            listen: socket !== undefined ? { path: socket } : { port: opts.port!, host: opts.bind },
            cacheBytes,
            readAhead: opts.readAhead ?? DEFAULT_READ_AHEAD,
            onError: (err) => out.warn(`NBD connection: ${err.message}`),
          });
          try {
            const addr = running.address;
            const uri = (name: string) =>
              "path" in addr
                ? `nbd+unix:///${name}?socket=${addr.path}`
                : `nbd://${addr.host.includes(":") ? `[${addr.host}]` : addr.host}:${addr.port}/${name}`;
            const exports = running.exports.map((d) => ({ name: d.name, size: d.size, uri: uri(d.name) }));
            if (out.json) {
              process.stdout.write(
                `${JSON.stringify({
                  type: "ready",
                  id: `${snap.vm}/${snap.time}`,
                  exports,
                  ...("path" in addr ? { socket: addr.path } : { host: addr.host, port: addr.port }),
                })}\n`,
              );
            } else {
              const first = exports[0]!;
              out.info(
                [
                  `serving ${snap.vm}/${snap.time} read-only over NBD:`,
                  ...exports.map((e) => `  ${e.name} (${formatBytes(e.size)}): ${e.uri}`),
                  `for example: qemu-img convert -p -f raw '${first.uri}' -O qcow2 ${first.name}.qcow2`,
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
          out.result({ type: "summary", id: `${snap.vm}/${snap.time}`, exports: stats }, () =>
            stats
              .map(
                (s) =>
                  `${s.name}: ${s.hits} cache hits, ${s.misses} fetches, ${s.readAheadFetches} read ahead, ` +
                  `${s.fetchErrors} failed; cache peak ${formatBytes(s.peakCachedBytes)} of ${formatBytes(s.cacheBytes)}`,
              )
              .join("\n"),
          );
        } finally {
          await lock.release();
        }
      });
    });
}
