// JSON as Python's `json` module reads and writes it, where a digest depends on the exact text:
// the manifest's own sha256 (json.dumps(body, sort_keys=True, separators=(",", ":"))) and the
// checkpoint's (json.dumps(meta, sort_keys=True)). JSON.parse forgets whether a number was written
// as a float ("1.0") or an int ("1"); Python does not, so numbers are kept as PyFloat or integers.

/** A number Python holds as a float. */
export class PyFloat {
  constructor(value) { this.value = value; }
  valueOf() { return this.value; }
}

/** repr(float) in Python: the shortest round-trip digits, scientific below 1e-4 and from 1e16. */
export function pyFloatRepr(x) {
  if (Number.isNaN(x)) return "NaN";
  if (x === Infinity) return "Infinity";
  if (x === -Infinity) return "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  const [mant, e] = Math.abs(x).toExponential().split("e");
  const digits = mant.replace(".", "");
  const exp = Number(e);
  if (exp >= -4 && exp < 16) {
    if (exp < 0) return `${sign}0.${"0".repeat(-exp - 1)}${digits}`;
    const int = digits.slice(0, exp + 1).padEnd(exp + 1, "0");
    const frac = digits.slice(exp + 1) || "0";
    return `${sign}${int}.${frac}`;
  }
  const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
}

function pyString(s) {
  // json.dumps with ensure_ascii=True
  return JSON.stringify(s).replace(/[\u007f-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

/** json.dumps(value, sort_keys=True, separators=seps) of a value from parsePy (or built with PyFloat). */
export function pyDumps(value, { itemSep = ", ", keySep = ": " } = {}) {
  const dump = (v) => {
    if (v === null || v === undefined) return "null";
    if (v === true) return "true";
    if (v === false) return "false";
    if (v instanceof PyFloat) return pyFloatRepr(v.value);
    if (typeof v === "bigint") return v.toString();
    if (typeof v === "number") {
      if (!Number.isInteger(v)) return pyFloatRepr(v); // a non-integral JS number can only be a float
      return String(v);
    }
    if (typeof v === "string") return pyString(v);
    if (Array.isArray(v)) return "[" + v.map(dump).join(itemSep) + "]";
    const keys = Object.keys(v).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    return "{" + keys.map((k) => pyString(k) + keySep + dump(v[k])).join(itemSep) + "}";
  };
  return dump(value);
}

/** JSON text to values, with floats as PyFloat and integers as numbers (BigInt beyond 2**53). */
export function parsePy(text) {
  let i = 0;
  const fail = (what) => { throw new SyntaxError(`${what} at position ${i}`); };
  const ws = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  const value = (depth) => {
    if (depth > 512) fail("nesting too deep");
    ws();
    const c = text[i];
    if (c === "{") {
      i++; const o = {}; ws();
      if (text[i] === "}") { i++; return o; }
      for (;;) {
        ws(); if (text[i] !== '"') fail("expected a key");
        const k = str(); ws(); if (text[i++] !== ":") fail("expected ':'");
        Object.defineProperty(o, k, { value: value(depth + 1), enumerable: true, writable: true, configurable: true });
        ws(); const d = text[i++];
        if (d === "}") return o;
        if (d !== ",") fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      i++; const a = []; ws();
      if (text[i] === "]") { i++; return a; }
      for (;;) {
        a.push(value(depth + 1)); ws(); const d = text[i++];
        if (d === "]") return a;
        if (d !== ",") fail("expected ',' or ']'");
      }
    }
    if (c === '"') return str();
    for (const [lit, v] of [["true", true], ["false", false], ["null", null]])
      if (text.startsWith(lit, i)) { i += lit.length; return v; }
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
    if (!m) fail("unexpected character");
    i += m[0].length;
    if (m[2] || m[3]) return new PyFloat(Number(m[0]));
    const n = Number(m[0]);
    return Number.isSafeInteger(n) ? n : BigInt(m[0]);
  };
  const str = () => {
    const start = i++;
    while (i < text.length && text[i] !== '"') { if (text[i] === "\\") i++; i++; }
    if (i >= text.length) fail("unterminated string");
    i++;
    return JSON.parse(text.slice(start, i));
  };
  const v = value(0); ws();
  if (i !== text.length) fail("extra data");
  return v;
}

/** A parsePy value with PyFloat turned into plain numbers (what the runtime works with). */
export function plain(v) {
  if (v instanceof PyFloat) return v.value;
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}
