// deviceName and launchAppliance against a scripted appliance (the real one is driven in
// test/files/guestfs.test.ts; an appliance that answers "no drives", or that is not ready after a
// run that reported nothing, could not be made to happen on purpose).
import assert from "node:assert/strict";
import { test } from "node:test";
import { isStrataError } from "../../util/errors.js";
import { deviceName, type Fish, type GuestfsTarget, launchAppliance } from "./guestfs.js";

function scripted(answers: string[]): { fish: Fish; asked: string[][] } {
  const asked: string[][] = [];
  return {
    asked,
    fish: async (args) => {
      asked.push(args);
      return answers.shift() ?? "";
    },
  };
}

const target: GuestfsTarget = {
  disks: ["root", "data"],
  device: { disk: "data", partition: 2 },
  where: "web1/2026-11-29T10:00:00Z disk data partition 2",
};

test("a partition of the second disk is the second drive's partition", async () => {
  const { fish } = scripted(["/dev/sda\n/dev/sdb\n"]);
  assert.equal(await deviceName(fish, target), "/dev/sdb2");
  const whole = scripted(["/dev/sda\n/dev/sdb\n"]);
  assert.equal(
    await deviceName(whole.fish, { ...target, device: { disk: "root", partition: 0 } }),
    "/dev/sda",
  );
});

test("an empty drive list is asked for again once, then named in the error", async () => {
  const once = scripted(["", "/dev/sda\n/dev/sdb\n"]);
  assert.equal(await deviceName(once.fish, target), "/dev/sdb2");
  assert.equal(once.asked.length, 2);
  const never = scripted(["", ""]);
  await assert.rejects(deviceName(never.fish, target), (err: unknown) => {
    assert.ok(isStrataError(err, "EXTERNAL"), String(err));
    assert.match(String(err), /no drive for disk data \(drive 2 of 2 attached; it lists none\)/);
    return true;
  });
  const short = scripted(["/dev/sda\n"]);
  await assert.rejects(deviceName(short.fish, target), /it lists \/dev\/sda\)/);
});

test("an appliance still unlaunched after run is started once more; twice is an error naming both", async () => {
  const once = scripted(["", "true\n", "", "false\n"]);
  await launchAppliance(once.fish);
  assert.deepEqual(once.asked, [["run"], ["is-config"], ["run"], ["is-config"]]);
  const ready = scripted(["", "false\n"]);
  await launchAppliance(ready.fish);
  assert.equal(ready.asked.length, 2, "a running appliance is started once");
  const never = scripted(["", "true", "", "true"]);
  await assert.rejects(launchAppliance(never.fish), (err: unknown) => {
    assert.ok(isStrataError(err));
    assert.match(err.message, /did not start, twice: .*is-config: true.*then .*is-config: true/);
    return true;
  });
});
