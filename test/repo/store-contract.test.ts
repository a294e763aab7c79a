// The shared Store contract (test/helpers/store-contract.ts) on a local directory; the S3 store
// runs the same suite in test/s3/s3-store.test.ts.
import { join } from "node:path";
import { FsStore } from "../../src/repo/fs-store.js";
import { tempDir } from "../helpers/cli.js";
import { storeContract } from "../helpers/store-contract.js";

storeContract("fs", async (t) => new FsStore(join(tempDir(t), "repo")));
