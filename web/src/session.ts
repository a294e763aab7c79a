import { createContext } from "preact";
import { useContext } from "preact/hooks";
import type { Whoami } from "./api";

export const Session = createContext<Whoami | null>(null);

/** Whether the logged-in role may do `action` (src/catalog/roles.ts); the UI hides what it may not. */
export function useCan(): (action: string) => boolean {
  const who = useContext(Session);
  return (action) => who?.actions.includes(action) ?? false;
}

/** The action a job's "run now" needs, as the API decides it. */
export function runAction(kind: string): string {
  return kind === "backup"
    ? "backup.start"
    : kind === "verify"
      ? "verify.start"
      : kind === "retention"
        ? "forget.run"
        : "jobs.manage";
}
