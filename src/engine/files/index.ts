/**
 * Single-file restore: browse and copy files from inside a restore point's disks, straight
 * from the repository, without restoring the disk.
 *
 * Design. A disk of a restore point is a {@link RestorePointSource}: reads map to chunks through
 * the fixed index, chunks are fetched on demand, verified and cached (LRU, bounded), and
 * sequential reads fetch ahead. Everything above it only sees a read-only `ByteSource`: the
 * partition table (MBR with logical partitions, or GPT) is parsed from it, a partition is a
 * slice of it, and the filesystem in the slice is recognised by its magic number and read
 * in-process (ext2/3/4 through libext2fs in WebAssembly, with the journal of an uncleanly
 * unmounted filesystem replayed in memory; FAT12/16/32 by our own reader). So listing a
 * directory of a 100 GiB disk fetches a handful of chunks, and nothing is ever written to the
 * repository or the guest. XFS, Btrfs and NTFS are read through libguestfs when guestfish is
 * installed (a sandboxed appliance VM against an NBD export of the disk, see guestfs.ts);
 * anything else (LUKS, swap, unknown) is named in a clear error.
 *
 * LVM. The label and metadata of every physical volume on every disk are read in-process
 * (image/lvm.ts), so `files ls` lists volume groups and their logical volumes (a VG may span
 * disks; a PV no disk holds is named as missing) without starting anything, and a linear LV's
 * filesystem is recognised by magic number through its extents. A selection names an LV as
 * `[DISK:]VG/LV`; its files are read through libguestfs with every disk that holds a PV of its
 * VG attached, whatever filesystem it holds. A missing VG or LV, a missing PV, swap, or an LV
 * whose head is all zeros fail before any appliance boots.
 *
 * `restoreFiles` first walks everything asked for (so a missing path fails before anything is
 * written), then creates files, symlinks and directories relative to open directory handles
 * under the target, so that nothing the guest wrote (symlinks, `../` in a name, modes) can make
 * it write outside the target (see extract.ts); modes and times are kept, owners and
 * setuid/setgid bits only on request; directories get their metadata last, after their
 * contents. `tarFiles` writes the same walk as a pax tar stream, with backpressure.
 * A damaged or missing chunk fails the read: a file is never restored with wrong bytes.
 *
 * Files: locate.ts (disk layout, LVM, selections), browse.ts (FileBrowser: open, ls, stat,
 * walk), extract.ts (restoreFiles, tarFiles), guestfs.ts (the libguestfs reader).
 */
export * from "./browse.js";
export * from "./extract.js";
export type { BtrfsSubvolume } from "./guestfs.js";
export * from "./locate.js";
