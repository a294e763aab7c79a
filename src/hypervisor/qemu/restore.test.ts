// The QEMU adapter's restore side on stored configurations: parseConfig refuses tampered
// documents (they may come from a repository others can write), planRestore keeps every path
// of a clone inside its directory, and renderConfig gives the JSON definition and the command
// line. Pure: nothing is written or started (the accelerator is given, not probed).
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { RestorePlanOptions, VmConfigDocument } from "../adapter.js";
import { parseQemuConfig } from "./config.js";
import { buildCommandLine } from "./launcher.js";
import type { VmConfig } from "./live.js";
import { planQemuRestore, qemuRestore, renderQemuConfig } from "./restore.js";

function stored(): VmConfig {
  return {
    kind: "qemu",
    name: "web1",
    uuid: "11111111-2222-3333-4444-555555555555",
    machine: "q35",
    cpus: 2,
    memoryBytes: 256 * 2 ** 20,
    disks: [
      {
        name: "vblk0",
        node: "disk0",
        device: "/machine/peripheral/vblk0/virtio-backend",
        format: "qcow2",
        file: "/vms/web1/root.qcow2",
        size: 2 ** 20,
      },
    ],
    nics: [{ id: "nic0", type: "virtio-net-pci", mac: "52:54:00:12:34:56" }],
    firmware: "seabios (default)",
    commandLine: [
      "/usr/bin/qemu-system-x86_64",
      ...buildCommandLine(
        {
          runDir: "/vms/web1/run",
          name: "web1",
          disks: [{ file: "/vms/web1/root.qcow2", format: "qcow2", nodeName: "disk0", id: "vblk0" }],
          extraArgs: [
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56",
          ],
        },
        "tcg",
      ),
    ],
  };
}

/** A stored document, JSON round-tripped and then changed by `edit`. */
function tampered(edit: (c: Record<string, unknown> & VmConfig) => void): unknown {
  const c = JSON.parse(JSON.stringify(stored())) as Record<string, unknown> & VmConfig;
  edit(c);
  return c;
}

const options = (extra: Partial<RestorePlanOptions> = {}): RestorePlanOptions => ({
  available: [{ name: "vblk0", size: 2 ** 20 }],
  restorePoint: { vm: "web1", time: "2026-11-29T10:00:00Z", consistency: "crash-consistent" },
  ...extra,
});
const tcg = { accel: "tcg" as const, reason: "test" };
const doc = (c: unknown) => c as VmConfigDocument;

describe("parseConfig", () => {
  test("a configuration Strata wrote comes back whole, unknown fields dropped", () => {
    const c = tampered((x) => {
      x.extra = "ignored";
    });
    assert.deepEqual(parseQemuConfig(c), stored());
    assert.deepEqual(qemuRestore.parseConfig(doc(c)), stored());
  });

  const refusals: Array<[string, (c: Record<string, unknown> & VmConfig) => void, RegExp]> = [
    [
      "a program that is not qemu-system-*",
      (c) => {
        c.commandLine![0] = "/bin/sh";
      },
      /runs "\/bin\/sh", not a qemu-system-\* binary/,
    ],
    [
      "a qemu-system-* name reached through ..",
      (c) => {
        c.commandLine![0] = "/usr/bin/../../tmp/qemu-system-x86_64";
      },
      /not a qemu-system-\* binary/,
    ],
    [
      "a relative program path",
      (c) => {
        c.commandLine![0] = "bin/qemu-system-x86_64";
      },
      /not a qemu-system-\* binary/,
    ],
    [
      "a disk path with ..",
      (c) => {
        c.disks[0]!.file = "/vms/web1/../../etc/shadow";
      },
      /disks\.0\.file: the disk file "\/vms\/web1\/..\/..\/etc\/shadow" has a ".." segment/,
    ],
    [
      "a disk name that is not a plain name",
      (c) => {
        c.disks[0]!.name = "../../etc/cron.d/x";
      },
      /disk name "..\/..\/etc\/cron.d\/x" is not a plain name/,
    ],
    [
      "a VM name with a slash",
      (c) => {
        c.name = "../../root/x";
      },
      /the VM name "..\/..\/root\/x" is not a plain name/,
    ],
    [
      "a node-name QEMU would not take",
      (c) => {
        c.disks[0]!.node = "disk0,file.filename=/etc/passwd";
      },
      /node-name .* is not a QEMU id/,
    ],
    [
      "a disk listed twice",
      (c) => {
        c.disks.push({ ...c.disks[0]! });
      },
      /disks\.1\.name: disk name vblk0 appears twice/,
    ],
    [
      "a size that is not a whole number",
      (c) => {
        c.disks[0]!.size = -1;
      },
      /disks\.0\.size: the disk size is not a whole number/,
    ],
    [
      "an absurd CPU count",
      (c) => {
        c.cpus = 1e9;
      },
      /the CPU count is not a whole number from 0 to 4096/,
    ],
    [
      "a MAC that is not one",
      (c) => {
        c.nics[0]!.mac = "52:54:00:12:34:56,id=x";
      },
      /MAC .* is not a MAC address/,
    ],
    [
      "too long a command line",
      (c) => {
        c.commandLine!.push(...Array.from({ length: 20 }, () => "x".repeat(60_000)));
      },
      /the command line is longer than 1048576 bytes/,
    ],
    [
      "an argument of the wrong type",
      (c) => {
        (c.commandLine as unknown[]).push({ evil: true });
      },
      /commandLine\.\d+: an argument of the command line is not a string/,
    ],
    [
      "a command line whose tap runs a host script",
      (c) => {
        c.commandLine!.push("-netdev", "tap,id=n1,script=/tmp/x/evil.sh");
      },
      /its command line: -netdev tap: script=\/tmp\/x\/evil\.sh runs a host program/,
    ],
    [
      "a command line opening a host file writable",
      (c) => {
        c.commandLine!.push("-drive", "file=/etc/shadow,if=virtio,format=raw");
      },
      /its command line: -drive .*\/etc\/shadow is not one of the VM's disks, and would be opened writable/,
    ],
    [
      "another adapter's document",
      (c) => {
        (c as { kind: string }).kind = "libvirt";
      },
      /its kind is "libvirt", not "qemu"/,
    ],
  ];
  for (const [what, edit, message] of refusals) {
    test(`refuses ${what}`, () => {
      assert.throws(
        () => parseQemuConfig(tampered(edit)),
        (err: Error & { code?: string }) => {
          assert.equal(err.code, "DATA_CORRUPT");
          assert.match(err.message, /the restore point's QEMU configuration is not usable/);
          assert.match(err.message, message);
          return true;
        },
      );
    });
  }
});

describe("planRestore", () => {
  test("a clone's disks, run files and definition all go inside --target", async () => {
    const plan = await planQemuRestore(doc(stored()), options({ target: "/clones/c1", name: "c1" }), tcg);
    assert.equal(plan.clone, true);
    assert.deepEqual(
      plan.disks.map((d) => d.path),
      ["/clones/c1/vblk0.qcow2"],
    );
    assert.equal(plan.definition.file, "/clones/c1/c1.json");
    assert.equal(plan.qmpSocket, "/clones/c1/run/qmp.sock");
    assert.ok(!plan.argv.some((a) => a.includes("/vms/web1")), plan.argv.join(" "));
    assert.notEqual(plan.config.uuid, stored().uuid);
    const def = JSON.parse(plan.definition.text) as Record<string, unknown>;
    assert.equal(def.format, "strata-vm");
    assert.equal(def.restoredFrom, "web1/2026-11-29T10:00:00Z");
    assert.deepEqual(def.commandLine, plan.argv);
    assert.equal(renderQemuConfig(plan.config, "json"), plan.definition.text);
    assert.match(renderQemuConfig(plan.config, "qemu-args"), /^\/usr\/bin\/qemu-system-x86_64 -name c1 /);
    assert.throws(() => renderQemuConfig(plan.config, "xml"), /written as json or qemu-args, not "xml"/);
  });

  test("a definition file that would land outside --target is refused", async () => {
    await assert.rejects(
      planQemuRestore(doc(stored()), options({ target: "/clones/c1", name: "../../etc/c1" }), tcg),
      /\/etc\/c1\.json would be written outside \/clones\/c1/,
    );
  });

  test("a VM name that is no file name gives way to the repository's name", async () => {
    const c = tampered((x) => {
      x.name = "web 1 (prod)";
    });
    const plan = await planQemuRestore(doc(c), options({ target: "/clones/c1" }), tcg);
    assert.equal(plan.definition.file, "/clones/c1/web1-restored.json");
  });

  test("in place keeps the recorded paths; a disk that is no local file is refused", async () => {
    const plan = await planQemuRestore(doc(stored()), options(), tcg);
    assert.deepEqual(
      plan.disks.map((d) => d.path),
      ["/vms/web1/root.qcow2"],
    );
    assert.equal(plan.definition.file, undefined);
    assert.equal(plan.config.uuid, stored().uuid);
    const nbd = tampered((x) => {
      x.disks[0]!.file = "nbd://storage:10809/root";
      x.commandLine = x.commandLine!.map((a) =>
        a.replace("/vms/web1/root.qcow2", "nbd://storage:10809/root"),
      );
    });
    await assert.rejects(
      planQemuRestore(doc(nbd), options(), tcg),
      /not a local file: restore it as a clone/,
    );
  });
});
