/**
 * libvirt's XML documents (domain, checkpoint, backup) as a small ordered tree, read and written
 * back without losing elements Strata does not know (fast-xml-parser in its order-preserving
 * form). What is parsed may come from a repository others can write: documents are bounded in
 * size and depth, and DOCTYPE/ENTITY declarations are refused before parsing.
 */
import { createRequire } from "node:module";
import { ErrorCode, StrataError } from "../../util/errors.js";

/**
 * fast-xml-parser, loaded on first use (its one-file CommonJS build): every command imports this
 * module through the adapter registry, few read XML, and its ESM build's 40-odd module files
 * cost a command that starts with a cold page cache a few hundredths of a second.
 */
function fxp(): typeof import("fast-xml-parser") {
  return createRequire(import.meta.url)("fast-xml-parser") as typeof import("fast-xml-parser");
}

/** The largest XML document Strata reads (a domain XML is a few KiB). */
export const MAX_XML = 1024 * 1024;
const MAX_DEPTH = 32;

/** An element: its tag, attributes and children (text children have tag "#text"). */
export interface XElement {
  tag: string;
  attrs: Record<string, string>;
  children: XElement[];
  /** For "#text" nodes. */
  text?: string;
}

const OPTIONS = {
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: "@_",
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: false,
  processEntities: true,
  commentPropName: "#comment",
} as const;

type Raw = Record<string, unknown>;

function fromRaw(raw: Raw, depth: number, what: string): XElement {
  if (depth > MAX_DEPTH) throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: XML nested too deeply`);
  if (typeof raw["#text"] === "string" || typeof raw["#text"] === "number") {
    return { tag: "#text", attrs: {}, children: [], text: String(raw["#text"]) };
  }
  const tag = Object.keys(raw).find((k) => k !== ":@");
  if (tag === undefined) throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: empty XML node`);
  const attrs: Record<string, string> = {};
  const a = raw[":@"];
  if (a && typeof a === "object") {
    for (const [k, v] of Object.entries(a as Raw)) if (k.startsWith("@_")) attrs[k.slice(2)] = String(v);
  }
  const kids = raw[tag];
  const children = Array.isArray(kids) ? kids.map((k) => fromRaw(k as Raw, depth + 1, what)) : [];
  return { tag, attrs, children };
}

function toRaw(e: XElement): Raw {
  if (e.tag === "#text") return { "#text": e.text ?? "" };
  const out: Raw = { [e.tag]: e.children.map(toRaw) };
  if (Object.keys(e.attrs).length > 0) {
    out[":@"] = Object.fromEntries(Object.entries(e.attrs).map(([k, v]) => [`@_${k}`, v]));
  }
  return out;
}

/** Parses `text` and returns its root element, which must be `<root>`. */
export function parseXml(text: string, root: string, what: string): XElement {
  if (text.length > MAX_XML)
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      `${what}: XML of ${text.length} bytes (at most ${MAX_XML})`,
    );
  if (/<!DOCTYPE|<!ENTITY/i.test(text))
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: XML with a DOCTYPE or ENTITY declaration`);
  // The parser is lenient (an unclosed element is closed silently): validate first.
  const valid = fxp().XMLValidator.validate(text);
  if (valid !== true)
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      `${what}: not well-formed XML (line ${valid.err.line}: ${valid.err.msg.slice(0, 200)})`,
    );
  let parsed: unknown;
  try {
    parsed = new (fxp().XMLParser)(OPTIONS).parse(text);
  } catch (err) {
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: not well-formed XML (${String(err)})`, {
      cause: err,
    });
  }
  const top = (Array.isArray(parsed) ? (parsed as Raw[]) : [])
    .map((r) => fromRaw(r, 0, what))
    .filter((e) => e.tag !== "#text" && e.tag !== "#comment" && !e.tag.startsWith("?"));
  const el = top[0];
  if (top.length !== 1 || !el || el.tag !== root)
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: expected one <${root}> element`);
  return el;
}

/** Serialises an element (and its subtree). */
export function buildXml(e: XElement): string {
  return new (fxp().XMLBuilder)({ ...OPTIONS, suppressEmptyNode: true }).build([toRaw(e)]) as string;
}

/** Child elements named `tag`. */
export function kids(e: XElement | undefined, tag: string): XElement[] {
  return e ? e.children.filter((c) => c.tag === tag) : [];
}

/** The first child element named `tag`, or undefined. */
export function kid(e: XElement | undefined, tag: string): XElement | undefined {
  return e?.children.find((c) => c.tag === tag);
}

/** The element at a path of tags below `e`. */
export function at(e: XElement | undefined, ...path: string[]): XElement | undefined {
  let cur = e;
  for (const p of path) cur = kid(cur, p);
  return cur;
}

/** The text content of an element (its text children joined, trimmed). */
export function textOf(e: XElement | undefined): string | undefined {
  if (!e) return undefined;
  return e.children
    .filter((c) => c.tag === "#text")
    .map((c) => c.text ?? "")
    .join("")
    .trim();
}

/** Replaces the text content of an element. */
export function setText(e: XElement, text: string): void {
  e.children = [
    ...e.children.filter((c) => c.tag !== "#text"),
    { tag: "#text", attrs: {}, children: [], text },
  ];
}

/** A new element. */
export function el(tag: string, attrs: Record<string, string> = {}, children: XElement[] = []): XElement {
  return { tag, attrs, children };
}

/** A new element holding only text. */
export function textEl(tag: string, text: string, attrs: Record<string, string> = {}): XElement {
  return { tag, attrs, children: [{ tag: "#text", attrs: {}, children: [], text }] };
}

/** Removes every child element named `tag`. */
export function removeKids(e: XElement, tag: string): void {
  e.children = e.children.filter((c) => c.tag !== tag);
}

/** Escapes text for an XML attribute or element written by hand. */
export function xmlEscape(s: string): string {
  return s
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&apos;");
}
