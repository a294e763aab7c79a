/**
 * The CDP section of npm run bench: what a day of the Debian disk's workload costs in journal
 * space. Every 4 KiB block that differs from one day's image to the next is taken as written once
 * that day, in runs of consecutive changed blocks of at most 128 KiB (what a guest's block layer
 * sends as one request), and appended through the real JournalWriter (zstd, as `strata protect`
 * journals). A lower bound of what a guest writes: it rewrites some blocks more than once a day,
 * and ext4's own journal writes metadata twice.
 */

import { statSync } from "node:fs";
import { open, rm } from "node:fs/promises";
import { JournalWriter } from "../src/journal/writer.js";
import { fmt, MiB } from "./measure.js";

const BLOCK = 4096;
const MAX_WRITE = 128 * 1024;
const PIECE = 4 * MiB;

/** The CDP section's name, matched by STRATA_BENCH_ONLY like a tool's. */
export const JOURNAL_NAME = "strata protect journal, a day of the Debian disk";

export async function benchJournalDay(images: readonly string[], work: string): Promise<void> {
  console.log(`\n## ${JOURNAL_NAME}\n`);
  console.log(
    "Each 4 KiB block that differs from the day before, written once, in runs of at most 128 KiB, " +
      "appended through the journal writer (zstd, unencrypted; encryption adds a fixed 28 bytes per write).\n",
  );
  console.log("| day | writes | written MiB | journal MiB | journal bytes per GiB written |");
  console.log("| --- | --- | --- | --- | --- |");
  const size = statSync(images[0]!).size;
  for (let day = 1; day < images.length; day++) {
    const dir = `${work}/journal-day-${day}`;
    await rm(dir, { recursive: true, force: true });
    const journal = await JournalWriter.open({
      dir,
      keys: undefined,
      vm: "bench",
      repository: "bench",
      disks: [{ name: "disk", size }],
    });
    const before = await open(images[day - 1]!, "r");
    const after = await open(images[day]!, "r");
    const a = Buffer.alloc(PIECE);
    const b = Buffer.alloc(PIECE);
    const pending: Array<Promise<void>> = [];
    let runStart = -1;
    let runEnd = -1;
    const flush = async () => {
      if (runStart < 0) return;
      const data = Buffer.alloc(runEnd - runStart);
      await after.read(data, 0, data.length, runStart);
      pending.push(journal.write("disk", runStart, data));
      if (pending.length >= 64) await Promise.all(pending.splice(0));
      runStart = -1;
    };
    try {
      for (let off = 0; off < size; off += PIECE) {
        const n = Math.min(PIECE, size - off);
        await before.read(a, 0, n, off);
        await after.read(b, 0, n, off);
        for (let k = 0; k < n; k += BLOCK) {
          const changed = a.compare(b, k, k + BLOCK, k, k + BLOCK) !== 0;
          const at = off + k;
          if (!changed) {
            await flush();
            continue;
          }
          if (runStart >= 0 && (runEnd !== at || runEnd - runStart >= MAX_WRITE)) await flush();
          if (runStart < 0) runStart = at;
          runEnd = at + BLOCK;
        }
      }
      await flush();
      await Promise.all(pending);
    } finally {
      await before.close();
      await after.close();
      await journal.close();
    }
    const st = journal.stats();
    console.log(
      `| ${day} | ${st.entries} | ${fmt(st.dataBytes / MiB, 1)} | ${fmt(st.journalBytes / MiB, 1)} | ${fmt((st.journalBytes / Math.max(1, st.dataBytes)) * 1024, 0)} MiB |`,
    );
    await rm(dir, { recursive: true, force: true });
  }
}
