/**
 * QEMU adapter: the control channels a live backup stands on.
 *
 * - {@link QmpClient} (qmp.ts) drives QEMU itself: block nodes, bitmaps, jobs, exports, events.
 * - {@link QgaClient} (qga.ts) talks to the guest agent: ping, fsfreeze around the cut of a
 *   point-in-time view, shutdown.
 * - {@link launchQemu} (launcher.ts) starts VMs with the block graph Strata expects (explicit
 *   node-names on both layers, device ids) for instant recovery, verify-by-boot and tests.
 *
 * Both clients share wire.ts: newline-delimited JSON over unix sockets, QMP-style errors kept as
 * {@link QemuCommandError} (class and desc), protocol violations as PROTOCOL errors that close the
 * connection, deadlines on every call.
 */
export {
  type Accelerator,
  type AcceleratorChoice,
  buildCommandLine,
  chooseAccelerator,
  type DiskSpec,
  type ExitStatus,
  type LaunchOptions,
  launchQemu,
  QemuVm,
  type StopOptions,
  type StopResult,
} from "./launcher.js";
export { type FsfreezeStatus, QgaClient, type QgaInfo, type QgaOptions } from "./qga.js";
export {
  type ExecuteOptions,
  QmpClient,
  type QmpConnectOptions,
  type QmpEvent,
  type QmpGreeting,
} from "./qmp.js";
export { QemuCommandError } from "./wire.js";
