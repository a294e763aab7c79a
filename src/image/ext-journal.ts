/**
 * In-memory replay of an ext3/ext4 journal (JBD2), for filesystems that were not cleanly
 * unmounted: a crash-consistent restore point of a running guest has `needs_recovery` set and
 * recent metadata only in the journal. The kernel would replay it at mount; libext2fs does
 * not, so without this the newest files would be missing or inconsistent.
 *
 * Nothing is written. The replay yields an overlay (filesystem block → its newest committed
 * content) that the reader lays over every read, following the kernel's recovery: scan from
 * `s_start`/`s_sequence` while block headers carry the expected sequence; a transaction counts
 * only once its commit block is found; a block revoked by a transaction at or after the one
 * that logged it is skipped; later transactions win; escaped blocks get their magic number
 * back. Checksums (csum v2/v3) are not verified: an uncommitted tail is dropped either way.
 * Not done: fast-commit blocks, orphan-list processing, external journals (an error).
 *
 * The journal is the guest's, so it is bounded before anything is allocated: the journal inode
 * may map at most {@link MAX_JOURNAL_BLOCKS} blocks (mke2fs's own maximum) and no more than the
 * filesystem has; the walk reads each journal block at most once; the overlay holds where each
 * replayed block is in the journal (not its bytes, which are read again when laid over a read),
 * at most {@link MAX_REPLAYED_BLOCKS} of them. So memory stays in tens of MiB whatever the
 * journal says.
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ByteSource } from "./byte-source.js";

const JBD2_MAGIC = 0xc03b3998;
const DESCRIPTOR = 1;
const COMMIT = 2;
const REVOKE = 5;

const INCOMPAT_RECOVER = 0x4;
const INCOMPAT_JOURNAL_DEV = 0x8;
const INCOMPAT_64BIT = 0x80;
const COMPAT_HAS_JOURNAL = 0x4;

const J_64BIT = 0x2;
const J_CSUM_V2 = 0x8;
const J_CSUM_V3 = 0x10;
const J_FAST_COMMIT = 0x20;

/** The largest journal mke2fs makes (`-J size=`): 10,240,000 blocks. */
export const MAX_JOURNAL_BLOCKS = 10_240_000;
/** Distinct filesystem blocks a replay may lay over the filesystem (8 GiB of 4 KiB blocks). */
export const MAX_REPLAYED_BLOCKS = 2 * 1024 * 1024;

const TAG_ESCAPE = 1;
const TAG_SAME_UUID = 2;
const TAG_LAST = 8;

/** Journal blocks to lay over the filesystem's own blocks. */
export class JournalOverlay {
  constructor(
    readonly blockSize: number,
    /** Filesystem block → where its newest copy is: journal block × 2, + 1 when escaped. */
    private readonly map: Map<number, number>,
    /** Reads journal block `i` (a block of the filesystem). */
    private readonly readJournal: (i: number) => Promise<Buffer>,
  ) {}

  /** Number of filesystem blocks replaced. */
  get blocks(): number {
    return this.map.size;
  }

  /** Replaces, in `buf` (the bytes at `position` of the filesystem), every replayed block. */
  async apply(buf: Buffer, position: number): Promise<void> {
    if (this.map.size === 0 || buf.length === 0) return;
    const bs = this.blockSize;
    const first = Math.floor(position / bs);
    const last = Math.floor((position + buf.length - 1) / bs);
    const visit = async (b: number, where: number) => {
      const data = Buffer.from(await this.readJournal(Math.floor(where / 2)));
      if (where % 2 === 1) data.writeUInt32BE(JBD2_MAGIC, 0);
      const from = Math.max(position, b * bs);
      const to = Math.min(position + buf.length, (b + 1) * bs);
      data.copy(buf, from - position, from - b * bs, to - b * bs);
    };
    if (last - first + 1 <= this.map.size) {
      for (let b = first; b <= last; b++) {
        const where = this.map.get(b);
        if (where !== undefined) await visit(b, where);
      }
    } else {
      for (const [b, where] of this.map) if (b >= first && b <= last) await visit(b, where);
    }
  }
}

/**
 * Replays the journal of the ext filesystem in `fs` if it needs recovery; undefined when it
 * does not (clean, or no journal).
 */
export async function replayJournal(fs: ByteSource): Promise<JournalOverlay | undefined> {
  const sb = await fs.read(1024, 1024);
  const compat = sb.readUInt32LE(0x5c);
  const incompat = sb.readUInt32LE(0x60);
  if (!(incompat & INCOMPAT_RECOVER) || !(compat & COMPAT_HAS_JOURNAL)) return undefined;
  const journalInode = sb.readUInt32LE(0xe0);
  if (journalInode === 0 || incompat & INCOMPAT_JOURNAL_DEV)
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      "the ext filesystem needs recovery from an external journal, which is not in this disk",
    );
  const logBlockSize = sb.readUInt32LE(0x18);
  if (logBlockSize > 6) throw corrupt(`block size 2^${10 + logBlockSize} bytes`);
  const bs = 1024 << logBlockSize;
  const fsBlocks = sb.readUInt32LE(0x04) + (incompat & INCOMPAT_64BIT ? sb.readUInt32LE(0x150) * 2 ** 32 : 0);
  const blocks = await journalBlocks(fs, sb, bs, journalInode, Math.min(MAX_JOURNAL_BLOCKS, fsBlocks));
  const readJ = (i: number) => {
    const phys = i < blocks.length ? blocks[i]! : 0;
    if (phys === 0 || (phys + 1) * bs > fs.size)
      throw corrupt(`journal block ${i} is beyond the journal or the filesystem`);
    return fs.read(phys * bs, bs);
  };

  const jsb = await readJ(0);
  if (jsb.readUInt32BE(0) !== JBD2_MAGIC) throw corrupt("the journal superblock has no JBD2 magic");
  const version = jsb.readUInt32BE(4);
  if (jsb.readUInt32BE(12) !== bs) throw corrupt("the journal block size differs from the filesystem's");
  const v2 = version === 4;
  const jIncompat = v2 ? jsb.readUInt32BE(0x28) : 0;
  let maxlen = Math.min(jsb.readUInt32BE(0x10), blocks.length);
  if (jIncompat & J_FAST_COMMIT) maxlen -= jsb.readUInt32BE(0x54) || 256;
  const first = jsb.readUInt32BE(0x14);
  let seq = jsb.readUInt32BE(0x18);
  let pos = jsb.readUInt32BE(0x1c);
  if (pos === 0) return new JournalOverlay(bs, new Map(), readJ); // the journal is empty
  if (maxlen <= 1 || first < 1 || first >= maxlen || pos >= maxlen)
    throw corrupt(`its superblock says first block ${first}, start ${pos}, length ${maxlen}`);
  const csum3 = (jIncompat & J_CSUM_V3) !== 0;
  const csum = csum3 || (jIncompat & J_CSUM_V2) !== 0;
  const is64 = (jIncompat & J_64BIT) !== 0;
  const tagBytes = csum3 ? 16 : 8 + (is64 ? 4 : 0) + (csum ? 2 : 0);
  const next = (p: number) => (p + 1 >= maxlen ? first : p + 1);

  // Transactions are replayed in order as their commit blocks are found: later ones win, and a
  // revoke cancels the copies logged by its own and earlier transactions (the kernel's rule,
  // "revoked at a sequence at or after the one that logged it", in one pass).
  const map = new Map<number, number>(); // block → journal position × 2 (+1 escaped)
  let pending: number[] = []; // block, position × 2 (+1 escaped), …
  let pendingRevokes: number[] = [];
  // A journal wraps at most once, and each step reads at least one block: bound by its length.
  for (let steps = 0; steps < maxlen; steps++) {
    const blk = await readJ(pos);
    if (blk.readUInt32BE(0) !== JBD2_MAGIC || blk.readUInt32BE(8) !== seq) break;
    const type = blk.readUInt32BE(4);
    if (type === DESCRIPTOR) {
      const end = bs - (csum ? 4 : 0);
      let o = 12;
      let p = pos;
      while (o + tagBytes <= end) {
        const lo = blk.readUInt32BE(o);
        const flags = csum3 ? blk.readUInt32BE(o + 4) : blk.readUInt16BE(o + 6);
        const hi = is64 ? blk.readUInt32BE(o + 8) : 0;
        p = next(p);
        steps++;
        pending.push(hi * 2 ** 32 + lo, p * 2 + (flags & TAG_ESCAPE ? 1 : 0));
        if (pending.length > 2 * MAX_REPLAYED_BLOCKS)
          throw corrupt(`a transaction logs more than ${MAX_REPLAYED_BLOCKS} blocks`);
        o += tagBytes + (flags & TAG_SAME_UUID ? 0 : 16);
        if (flags & TAG_LAST) break;
      }
      pos = next(p);
    } else if (type === REVOKE) {
      const used = Math.min(blk.readUInt32BE(12), bs);
      const size = is64 ? 8 : 4;
      for (let o = 16; o + size <= used; o += size)
        pendingRevokes.push(size === 8 ? Number(blk.readBigUInt64BE(o)) : blk.readUInt32BE(o));
      pos = next(pos);
    } else if (type === COMMIT) {
      for (let k = 0; k < pending.length; k += 2) map.set(pending[k]!, pending[k + 1]!);
      for (const b of pendingRevokes) map.delete(b);
      if (map.size > MAX_REPLAYED_BLOCKS) throw corrupt(`it replays more than ${MAX_REPLAYED_BLOCKS} blocks`);
      pending = [];
      pendingRevokes = [];
      seq = (seq + 1) >>> 0;
      pos = next(pos);
    } else break;
  }
  return new JournalOverlay(bs, map, readJ);
}

/**
 * Physical block of each logical block of the journal inode (0: a hole), at most `limit` of
 * them: the inode's size is checked against `limit` before anything is allocated.
 */
async function journalBlocks(
  fs: ByteSource,
  sb: Buffer,
  bs: number,
  ino: number,
  limit: number,
): Promise<Float64Array> {
  const incompat = sb.readUInt32LE(0x60);
  const inodesPerGroup = sb.readUInt32LE(0x28);
  const inodeSize = sb.readUInt32LE(0x4c) === 0 ? 128 : sb.readUInt16LE(0x58);
  const firstData = sb.readUInt32LE(0x14);
  const descSize = incompat & INCOMPAT_64BIT ? sb.readUInt16LE(0xfe) || 64 : 32;
  if (inodesPerGroup === 0 || inodeSize < 128 || inodeSize > bs || descSize < 32 || descSize > 1024)
    throw corrupt("its superblock has impossible inode or group descriptor sizes");
  const group = Math.floor((ino - 1) / inodesPerGroup);
  const index = (ino - 1) % inodesPerGroup;
  const read = (offset: number, length: number) => {
    if (offset < 0 || offset + length > fs.size)
      throw corrupt("the journal inode points beyond the filesystem");
    return fs.read(offset, length);
  };
  const desc = await read((firstData + 1) * bs + group * descSize, descSize);
  const table = desc.readUInt32LE(8) + (descSize >= 64 ? desc.readUInt32LE(0x28) * 2 ** 32 : 0);
  const inode = await read(table * bs + index * inodeSize, Math.min(inodeSize, 256));
  const size = inode.readUInt32LE(4) + inode.readUInt32LE(0x6c) * 2 ** 32;
  const count = Math.ceil(size / bs);
  if (count > limit)
    throw corrupt(
      `the journal inode claims ${size} bytes (${count} blocks); a journal has at most ${limit} ` +
        `(mke2fs makes at most ${MAX_JOURNAL_BLOCKS}, and no more than the filesystem has)`,
    );
  const out = new Float64Array(count);
  const iblock = inode.subarray(0x28, 0x28 + 60);
  if (inode.readUInt32LE(0x20) & 0x80000) {
    await extents(read, bs, iblock, out, 0);
  } else {
    const per = bs / 4;
    let n = 0;
    const walk = async (blk: number, depth: number): Promise<void> => {
      if (n >= count) return;
      if (depth === 0) {
        out[n++] = blk;
        return;
      }
      if (blk === 0) {
        n = Math.min(count, n + per ** depth); // a hole: no reads for what it would have held
        return;
      }
      const b = await read(blk * bs, bs);
      for (let i = 0; i < per && n < count; i++) await walk(b.readUInt32LE(i * 4), depth - 1);
    };
    for (let i = 0; i < 12; i++) await walk(iblock.readUInt32LE(i * 4), 0);
    for (let d = 1; d <= 3; d++) await walk(iblock.readUInt32LE((11 + d) * 4), d);
  }
  return out;
}

async function extents(
  read: (offset: number, length: number) => Promise<Buffer>,
  bs: number,
  node: Buffer,
  out: Float64Array,
  level: number,
): Promise<void> {
  if (node.readUInt16LE(0) !== 0xf30a || level > 5)
    throw corrupt("the journal inode has a damaged extent tree");
  const entries = Math.min(node.readUInt16LE(2), Math.floor((node.length - 12) / 12));
  const depth = node.readUInt16LE(6);
  for (let i = 0; i < entries; i++) {
    const e = node.subarray(12 + i * 12, 24 + i * 12);
    if (depth === 0) {
      const logical = e.readUInt32LE(0);
      let len = e.readUInt16LE(4);
      if (len > 32768) len -= 32768;
      const start = e.readUInt16LE(6) * 2 ** 32 + e.readUInt32LE(8);
      for (let k = 0; k < len && logical + k < out.length; k++) out[logical + k] = start + k;
    } else {
      const leaf = e.readUInt16LE(8) * 2 ** 32 + e.readUInt32LE(4);
      await extents(read, bs, await read(leaf * bs, bs), out, level + 1);
    }
  }
}

function corrupt(why: string): StrataError {
  return new StrataError(ErrorCode.DATA_CORRUPT, `cannot replay the ext journal: ${why}`);
}
