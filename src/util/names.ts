/**
 * File names from a guest, on the host: which can be created (one path component, nothing
 * more), and how to show any of them on a terminal without letting it act on the terminal.
 */

/** The longest name Linux takes (NAME_MAX), in bytes. */
export const NAME_MAX = 255;

/**
 * Why `name` cannot be one component of a path on the host (or of a tar member), or undefined
 * when it can: it must not be empty, "." or "..", hold "/" or NUL, or be longer than
 * {@link NAME_MAX} bytes.
 */
export function badName(name: string): string | undefined {
  if (name === "") return "an empty name";
  if (name === "." || name === "..") return `the name "${name}"`;
  if (name.includes("/")) return 'a name containing "/"';
  if (name.includes("\0")) return "a name containing NUL";
  if (Buffer.byteLength(name) > NAME_MAX) return `a name longer than ${NAME_MAX} bytes`;
  return undefined;
}

/** Why `rel` ("a/b/c") is not a safe relative path, or undefined: each component must pass {@link badName}. */
export function badRelativePath(rel: string): string | undefined {
  if (rel.startsWith("/")) return "an absolute path";
  for (const part of rel.split("/")) {
    const why = badName(part);
    if (why) return why;
  }
  return undefined;
}

/**
 * Characters a terminal may act on: C0 and C1 controls (escape sequences start with ESC or
 * CSI), DEL, and the bidirectional overrides and isolates that reorder what is shown; and the
 * backslash, so that an escaped name cannot be mistaken for another.
 */
const UNPRINTABLE = /[\p{Cc}\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\\]/gu;

/**
 * `text` with every character a terminal could act on written as an escape: `\e`, `\n`, `\t`,
 * `\xNN`, `\u{NNNN}`, and `\\` for a backslash. Plain text is returned as it is.
 */
export function printable(text: string): string {
  return text.replace(UNPRINTABLE, (c) => {
    switch (c) {
      case "\\":
        return "\\\\";
      case "\x1b":
        return "\\e";
      case "\n":
        return "\\n";
      case "\t":
        return "\\t";
      case "\r":
        return "\\r";
    }
    const code = c.codePointAt(0)!;
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u{${code.toString(16)}}`;
  });
}
