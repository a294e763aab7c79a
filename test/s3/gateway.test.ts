// The test gateway itself: a real Ceph RADOS Gateway starts and answers, and leaves nothing
// running once stopped.
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { test } from "node:test";
import { processesUsing, startGateway } from "../helpers/ceph.js";

test("a Ceph RADOS Gateway starts, answers S3, and stops with nothing left running", async () => {
  const gw = await startGateway();
  try {
    console.log(`gateway started in ${gw.startMs} ms at ${gw.endpoint}`);
    assert.ok((await processesUsing(gw.dir)).length >= 3, "mon, osd and radosgw run");
    const anonymous = await fetch(`${gw.endpoint}/`);
    assert.equal(anonymous.status, 200, "an anonymous ListBuckets answers (empty)");
    await anonymous.arrayBuffer();
    const users = await gw.admin("user", "info", "--uid=strata");
    assert.match(users, new RegExp(gw.accessKeyId));
  } finally {
    await gw.stop();
  }
  assert.deepEqual(await processesUsing(gw.dir), [], "no daemon of the cluster is left");
  assert.equal(existsSync(gw.dir), false, "its directory is gone");
});
