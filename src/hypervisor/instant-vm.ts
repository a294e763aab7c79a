/**
 * The schema of an {@link InstantVm} as read back from the engine's state file: the fields every
 * adapter has, with the adapter's own disk names and `data`. Adapters build theirs with
 * {@link instantVmSchema} and add the checks that span fields.
 */
import { z } from "zod";
import { absolutePath, list, object, oneOf, text, whole } from "../util/schema.js";

export function instantVmSchema<D extends z.ZodType>(opts: {
  adapter: string;
  /** How the adapter is named in messages: "QEMU", "libvirt". */
  platform: string;
  diskName: z.ZodType<string>;
  maxDisks: number;
  data: D;
}) {
  return object(
    {
      adapter: z.literal(opts.adapter, {
        error: (iss) => `it belongs to the ${JSON.stringify(iss.input)} adapter, not ${opts.platform}`,
      }),
      name: text("the name"),
      where: text("where it runs"),
      pid: whole("the QEMU pid", 2 ** 31).nullable(),
      disks: list(
        object(
          {
            name: opts.diskName,
            overlay: absolutePath("the overlay"),
            production: object(
              {
                path: absolutePath("the production file"),
                format: oneOf(["raw", "qcow2"], "the production format"),
              },
              "the production file",
            ).optional(),
          },
          "the disk",
        ),
        "the disk list",
        opts.maxDisks,
      ),
      data: opts.data,
      details: z
        .record(z.string(), text("the detail"), { error: "the details are not an object" })
        .refine((d) => Object.keys(d).length <= 1000, "the details have more than 1000 entries"),
      warnings: list(text("the warning"), "the warnings", 1000),
    },
    "the VM record",
  );
}
