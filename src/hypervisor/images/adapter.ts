/**
 * The image-file adapter ("file"): disk images and block devices as `file:PATH[,name=DISK]
 * [,format=FMT]`, several of them making one VM (`strata backup --vm db1 file:a file:b`, through
 * resolveGroup). No hypervisor is involved: the session reads the files as they are, so its
 * restore points are crash-consistent, carry no checkpoint (every backup reads the allocated
 * data; unchanged chunks are deduplicated), and their configuration lists the files.
 */
import type { BackupRequest, BackupSession, VmAdapter, VmConfigDocument, VmHandle } from "../adapter.js";
import { type FileSpec, openFileDisks, parseFileSpecs, type VettedSource, vetFileSources } from "./index.js";

export const FILE_USAGE = "file:PATH[,name=DISK][,format=FMT] (image files and block devices, one disk each)";

/**
 * The configuration a file restore point keeps: `{kind: "files", disks: [{name, source, format,
 * size}]}` as before adapters, with the fields every configuration document has.
 */
export interface FilesConfig extends VmConfigDocument {
  kind: "files";
  disks: Array<{ name: string; source: string; file: string; format: string; size: number }>;
}

async function openFilesSession(
  specs: readonly FileSpec[],
  request: BackupRequest,
  vetted: ReadonlyArray<Promise<VettedSource>> | undefined,
): Promise<BackupSession> {
  const opened = await openFileDisks(specs, vetted ? { vetted } : { warn: request.log });
  let closing: Promise<void> | undefined;
  const config: FilesConfig = {
    kind: "files",
    name: null,
    uuid: null,
    cpus: 0,
    memoryBytes: 0,
    disks: opened.map((d) => ({
      name: d.name,
      source: d.source,
      file: d.source,
      format: d.format,
      size: d.size,
    })),
    nics: [],
  };
  return {
    disks: opened.map((d) => ({
      name: d.name,
      source: d.source,
      size: d.size,
      read: (offset: number, length: number, into?: Buffer) => d.read(offset, length, into),
      ...(d.allocation ? { allocation: d.allocation.bind(d) } : {}),
    })),
    mode: "file",
    consistency: "crash-consistent",
    checkpoint: null,
    config,
    details: {},
    finish: () => {
      closing ??= Promise.all(opened.map((d) => d.close().catch(() => {}))).then(() => {});
      return closing;
    },
  };
}

export class ImageFileAdapter implements VmAdapter {
  readonly id = "file";
  readonly schemes = ["file"] as const;
  readonly usage = FILE_USAGE;

  resolve(uri: string): Promise<VmHandle> {
    return this.resolveGroup([uri]);
  }

  /** Every `file:` source one disk of the same VM; disk names made unique. */
  async resolveGroup(uris: readonly string[]): Promise<VmHandle> {
    const specs = parseFileSpecs(uris);
    // Vetted once: by prepare (while the repository opens), else by openBackup itself.
    let vetted: Array<Promise<VettedSource>> | undefined;
    return {
      adapter: this,
      source: uris.join(" "),
      defaultName: undefined,
      prepare: (log) => {
        vetted ??= vetFileSources(specs, log);
      },
      openBackup: (request) => {
        const early = vetted;
        vetted = undefined;
        return openFilesSession(specs, request, early);
      },
    };
  }
}
