import { render } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { PointButtons } from "./actions";
import { call, savedToken, saveToken, setOnUnauthorized, type Whoami } from "./api";
import { BrowsePage } from "./browse";
import { Dashboard } from "./dashboard";
import { InstantPage } from "./instant";
import { JobsPage, RunPage } from "./jobs";
import { Session } from "./session";
import "./style.css";
import { VmPage } from "./vm";

function useHash(): string[] {
  const parse = () =>
    location.hash
      .replace(/^#\/?/, "")
      .split("/")
      .filter(Boolean)
      .map((p) => decodeURIComponent(p));
  const [parts, setParts] = useState(parse);
  useEffect(() => {
    const on = () => {
      setParts(parse());
      window.scrollTo(0, 0);
    };
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  return parts;
}

function Login({ onLogin }: { onLogin: (w: Whoami, token: string) => void }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState<string>();
  const [busy, setBusy] = useState(false);
  const field = useRef<HTMLInputElement>(null);
  useEffect(() => field.current?.focus(), []);
  return (
    <main class="login">
      <h1>Strata</h1>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          setBusy(true);
          call<Whoami>("GET", "/whoami", undefined, token.trim()).then(
            (w) => onLogin(w, token.trim()),
            (err: Error) => {
              setError(err.message);
              setBusy(false);
            },
          );
        }}
      >
        <label for="token">API token</label>
        <input
          id="token"
          name="token"
          type="password"
          autoComplete="off"
          placeholder="strata_…"
          value={token}
          onInput={(e) => setToken((e.target as HTMLInputElement).value)}
          required
          ref={field}
        />
        <button type="submit" disabled={busy}>
          Log in
        </button>
        {error ? (
          <p class="bad" role="alert">
            {error}
          </p>
        ) : null}
        <p class="hint">
          Make one on the host: <code>strata token create --name me --role read</code>
        </p>
      </form>
    </main>
  );
}

function Page({ parts }: { parts: string[] }) {
  const [first, a] = parts;
  if (first === "vm" && a)
    return <VmPage name={a} actions={(p) => <PointButtons point={p} onChange={() => location.reload()} />} />;
  if (first === "browse" && a && parts[2])
    return (
      <BrowsePage
        vm={a}
        time={parts[2]}
        {...(parts[3] ? { fs: parts[3] } : {})}
        path={`/${parts.slice(4).join("/")}`}
      />
    );
  if (first === "instant") return <InstantPage />;
  if (first === "jobs") return <JobsPage />;
  if (first === "run" && a && /^\d+$/.test(a)) return <RunPage id={Number(a)} />;
  return <Dashboard />;
}

function App() {
  const [who, setWho] = useState<Whoami | null>(null);
  const [checking, setChecking] = useState(savedToken() !== null);
  const parts = useHash();
  useEffect(() => {
    setOnUnauthorized(() => {
      saveToken(null);
      setWho(null);
    });
    const t = savedToken();
    if (t)
      call<Whoami>("GET", "/whoami", undefined, t)
        .then(setWho, () => saveToken(null))
        .finally(() => setChecking(false));
  }, []);
  if (checking) return null;
  if (!who)
    return (
      <Login
        onLogin={(w, t) => {
          saveToken(t);
          setWho(w);
        }}
      />
    );
  const at = parts[0] ?? "";
  return (
    <Session.Provider value={who}>
      <header>
        <a class="brand" href="#/">
          Strata
        </a>
        <nav aria-label="main">
          <a href="#/" aria-current={at === "" || at === "vm" ? "page" : undefined}>
            Dashboard
          </a>
          <a href="#/jobs" aria-current={at === "jobs" || at === "run" ? "page" : undefined}>
            Policies and jobs
          </a>
          {who.actions.includes("instant.list") ? (
            <a href="#/instant" aria-current={at === "instant" ? "page" : undefined}>
              Instant recovery
            </a>
          ) : null}
        </nav>
        <span class="who" data-testid="role">
          {who.token ? who.token.name : "local"} · role <strong>{who.role}</strong>
        </span>
        <button
          type="button"
          onClick={() => {
            saveToken(null);
            setWho(null);
          }}
        >
          Log out
        </button>
      </header>
      <Page parts={parts} />
    </Session.Provider>
  );
}

render(<App />, document.getElementById("app")!);
