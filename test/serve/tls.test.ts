// strata serve hands out decrypted disks: over TCP only with TLS (NBD_OPT_STARTTLS, as QEMU's
// NBD server with tls-creds) and a client certificate signed by the given CA; on a unix socket
// (the default) only for the socket's owner. Checked against QEMU's own NBD client and libnbd.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { sha256File } from "../../src/image/synthetic.js";
import { strata, tempDir } from "../helpers/cli.js";
import { backedUpImage, makeTlsFiles, qemuTlsArgs, runTool, startServe } from "./helpers.js";

test("serve over TCP: QEMU's client with a certificate reads the disk; without one, or plain, it is refused", async (t) => {
  const dir = tempDir(t);
  const b = await backedUpImage(dir, { size: 2 * 1024 * 1024, seed: "tls" });
  const tls = await makeTlsFiles(await fs.mkdtemp(join(dir, "tls-")));

  // Plain TCP does not start, nor half-given TLS.
  for (const extra of [[], tls.serverArgs.slice(0, 4)]) {
    const r = await strata(["serve", "--repo", b.repo, b.id, "--port", "0", ...extra]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /serving over TCP \(--port\) needs TLS: give --tls-cert, --tls-key and --tls-ca/);
  }

  const s = await startServe(t, ["--repo", b.repo, b.id, "--port", "0", ...tls.serverArgs]);
  const port = s.ready.port!;
  assert.equal(s.ready.exports[0]!.uri, `nbds://127.0.0.1:${port}/root`);

  const info = JSON.parse(
    (await runTool("qemu-img", ["info", "--output=json", ...qemuTlsArgs(tls.client, port, "root")])).stdout,
  ) as { "virtual-size": number };
  assert.equal(info["virtual-size"], b.size);
  const out = join(dir, "out.raw");
  const conv = await runTool("qemu-img", [
    "convert",
    ...qemuTlsArgs(tls.client, port, "root"),
    "-O",
    "raw",
    out,
  ]);
  assert.equal(conv.code, 0, conv.stderr);
  assert.equal(await sha256File(out), await sha256File(b.image));
  const nbdinfo = await runTool("nbdinfo", [`nbds://127.0.0.1:${port}/root?tls-certificates=${tls.client}`]);
  assert.equal(nbdinfo.code, 0, nbdinfo.stderr);
  assert.match(nbdinfo.stdout, /with TLS/);

  // No certificate, a certificate of another CA: the TLS handshake fails.
  for (const [what, clientDir] of [
    ["no client certificate", tls.noCert],
    ["a certificate from another CA", tls.otherCa],
  ] as const) {
    const r = await runTool("qemu-img", ["info", ...qemuTlsArgs(clientDir, port, "root")]);
    assert.notEqual(r.code, 0, `${what}: ${r.stdout}`);
    assert.doesNotMatch(r.stdout, /virtual size/, what);
  }
  // No TLS at all: the server answers every option with "TLS required".
  const plain = await runTool("qemu-img", ["info", `nbd://127.0.0.1:${port}/root`]);
  assert.notEqual(plain.code, 0);
  assert.match(plain.stderr, /TLS negotiation required/);
  const plainInfo = await runTool("nbdinfo", ["--list", `nbd://127.0.0.1:${port}`]);
  assert.notEqual(plainInfo.code, 0);
  assert.doesNotMatch(plainInfo.stdout, /root/);

  const stopped = await s.stop();
  assert.equal(stopped.code, 0);
  assert.match(stopped.stderr, /TLS handshake failed: .*(peer did not return a certificate|certificate)/);
});

test("serve listens on an owner-only unix socket by default", async (t) => {
  const dir = tempDir(t);
  const b = await backedUpImage(dir, { size: 1024 * 1024, seed: "socket" });
  const run = join(dir, "run");
  const s = await startServe(t, ["--repo", b.repo, b.id], { STRATA_RUN_DIR: run });
  const sock = join(run, "vm1.sock");
  assert.equal(s.ready.socket, sock);
  assert.equal((await fs.stat(sock)).mode & 0o077, 0, "no one but the owner may connect");
  assert.equal((await fs.stat(run)).mode & 0o777, 0o700);
  const r = await runTool("nbdinfo", [`nbd+unix:///root?socket=${sock}`]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal((await s.stop()).code, 0);
  await assert.rejects(fs.stat(sock), /ENOENT/);
  // TLS options belong to --port.
  const tlsOnSocket = await strata([
    "serve",
    "--repo",
    b.repo,
    b.id,
    "--socket",
    join(dir, "s"),
    "--tls-ca",
    "x",
  ]);
  assert.equal(tlsOnSocket.code, 2);
  assert.match(tlsOnSocket.stderr, /go with --port/);
});
