/**
 * Source URIs → adapters. `strata backup SOURCE`, the inventory and the daemon resolve every
 * source here: the scheme (`qmp`, `vm`, `file`, `libvirt`, `pve`) picks the adapter, which parses
 * the rest. Adapters register once at start-up (the CLI's composition root); nothing below the
 * CLI knows which adapters exist.
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import type { VmAdapter, VmHandle } from "./adapter.js";

export class AdapterRegistry {
  private readonly bySchemes = new Map<string, VmAdapter>();
  private readonly byId = new Map<string, VmAdapter>();

  register(adapter: VmAdapter): this {
    if (this.byId.has(adapter.id))
      throw new StrataError(ErrorCode.INTERNAL, `adapter ${adapter.id} is registered twice`);
    for (const s of adapter.schemes) {
      const other = this.bySchemes.get(s);
      if (other)
        throw new StrataError(ErrorCode.INTERNAL, `scheme ${s}: is claimed by ${other.id} and ${adapter.id}`);
      this.bySchemes.set(s, adapter);
    }
    this.byId.set(adapter.id, adapter);
    return this;
  }

  /** Every registered adapter, in registration order. */
  adapters(): VmAdapter[] {
    return [...this.byId.values()];
  }

  /** The adapter that wrote a configuration document (its `kind`), or a clear error. */
  adapter(id: string): VmAdapter {
    const a = this.byId.get(id);
    if (!a)
      throw new StrataError(
        ErrorCode.USAGE,
        `no adapter "${id}" in this build (known: ${[...this.byId.keys()].join(", ")})`,
      );
    return a;
  }

  /** The adapter for a source URI's scheme. */
  adapterFor(uri: string): VmAdapter {
    const m = /^([a-z][a-z0-9+.-]*):/.exec(uri);
    const a = m ? this.bySchemes.get(m[1]!) : undefined;
    if (!a) {
      throw new StrataError(
        ErrorCode.USAGE,
        `unknown source "${uri}": sources look like ${this.adapters()
          .map((x) => x.usage)
          .join(", or ")}`,
      );
    }
    return a;
  }

  resolve(uri: string): Promise<VmHandle> {
    return this.adapterFor(uri).resolve(uri);
  }

  /**
   * The VM that `uris` name together: one source, or several of one adapter that groups them
   * (image files, one disk each). Mixing adapters, or several sources that each name a whole VM,
   * is a USAGE error.
   */
  resolveAll(uris: readonly string[]): Promise<VmHandle> {
    if (uris.length === 0) throw new StrataError(ErrorCode.USAGE, "no source given");
    const adapters = uris.map((u) => this.adapterFor(u));
    const first = adapters[0]!;
    if (uris.length === 1) return first.resolve(uris[0]!);
    const other = adapters.findIndex((a) => a !== first);
    if (other >= 0) {
      throw new StrataError(
        ErrorCode.USAGE,
        `sources "${uris[0]}" and "${uris[other]}" belong to different platforms (${first.id}, ${adapters[other]!.id}) and cannot make one VM`,
      );
    }
    if (!first.resolveGroup) {
      throw new StrataError(
        ErrorCode.USAGE,
        `a ${first.id} source (${first.schemes.map((s) => `${s}:`).join(" or ")}) names a whole VM and is backed up on its own: give one source`,
      );
    }
    return first.resolveGroup(uris);
  }
}
