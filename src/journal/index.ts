/**
 * The write journal: every guest write of a protected VM, in the order the VM issued them,
 * with the host time each one was acknowledged. A base restore point plus the journal replayed
 * up to an instant T gives the VM's disks at T (continuous data protection).
 *
 * Why one stream for all disks: a restore at T must cut every disk at the same instant, and a
 * journal per disk would need a second clock to merge them. Entries carry a journal-wide number
 * (+1 each) and a strictly increasing host time, so "everything up to T" is one prefix.
 *
 * Why replaying onto a base is safe when the base is newer than the journal's start: the base
 * is cut after capture starts, so it holds the effect of some prefix of the journal (and at most
 * the writes in flight at the cut). Replaying every entry from the start, in order, ends with
 * each byte as the last entry that wrote it left it — the same as the disk at T — and bytes no
 * entry wrote are the base's. Out of order it is wrong; src/journal/journal.test.ts proves both.
 *
 * Layout (docs/format.md, "Write journal"): journal.json (sealed: VM, disks, bases) and
 * append-only segment files seg-<n>.sjl; format.ts has the bytes, writer.ts the group commit,
 * reader.ts the checks (journal files are hostile input) and replay, targets.ts where replay
 * writes to.
 */
export * from "./format.js";
export * from "./marks.js";
export * from "./meta.js";
export * from "./overlay.js";
export * from "./reader.js";
export * from "./targets.js";
export * from "./writer.js";
