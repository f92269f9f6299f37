// Checkpoints in the Python runtime's format (runtime/checkpoint.py; BUNDLE.md), so
// that Python and JavaScript resume each other's. Version 4, written here: a safetensors file, one
// float32 tensor per manifest name, and `__metadata__` strings (format, version, step, epoch, seed,
// schedule and bundle as JSON text, bundle_manifest, target, sha256). The sha256 covers netstrings
// of the metadata and the tensor table and then the tensors' raw bytes, so nothing depends on how
// a JSON writer formats numbers. Version 3 (an uncompressed .npz with a JSON `__header__`, its
// sha256 over Python's json.dumps text) is still read. Here only the bytes are made and checked;
// where they are stored (a file with a previous generation in Node, IndexedDB in a browser) is
// the store's job (node.js: fileCheckpointStore).
import { CONTRACT } from "./contract.js";
import { CheckpointError } from "./errors.js";
import { readNpz } from "./npz.js";
import { parsePy, plain, pyDumps } from "./pyjson.js";
import { encodeSafetensors, floatTensor, readSafetensorsHeader, SafetensorsError } from "./safetensors.js";
import { sha256Hex } from "./signing.js";

export const { version: VERSION, reads: READS, format: FORMAT, schedules: SCHEDULES } = CONTRACT.checkpoint;
const { int_keys: INT_KEYS, json_keys: JSON_KEYS } = CONTRACT.checkpoint;
const DECIMAL = /^(0|[1-9][0-9]{0,17})$/;
const HEADER = "__header__";
const DTYPE_NAMES = { "<f4": "float32", "<f8": "float64", "|f1": "float8" };

// str(np.ascontiguousarray(a).shape) as Python's digest writes it: ascontiguousarray makes a 0-d
// array (AdamW's step counter) 1-d, so "()" never occurs there.
const pyShape = (s) => (s.length <= 1 ? `(${s.length ? s[0] : 1},)` : `(${s.join(", ")})`);

const concat = (parts) => {
  const all = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) { all.set(p, o); o += p.length; }
  return all;
};

async function digestV3(arrays, metaTree) {
  const enc = new TextEncoder();
  const parts = [enc.encode(pyDumps(metaTree))];
  for (const k of Object.keys(arrays).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))) {
    const a = arrays[k];
    parts.push(enc.encode(k), enc.encode(a.dtypeName + pyShape(a.shape)));
    parts.push(new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength));
  }
  return sha256Hex(concat(parts));
}

function compareBytes(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

/**
 * Version 4's checksum: sha256 over netstrings (`<byte length>:<bytes>,`) of the metadata's count,
 * its keys and values (all but sha256, keys in ascending order of their UTF-8 bytes), the tensors'
 * count, each tensor's name, dtype and comma-joined shape in data order, then the data section.
 */
export async function checkpointDigest(metadata, entries, data) {
  const enc = new TextEncoder();
  const parts = [];
  const net = (text) => { const b = enc.encode(text); parts.push(enc.encode(`${b.length}:`), b, enc.encode(",")); };
  const keys = Object.keys(metadata).filter((k) => k !== "sha256").sort((a, b) => compareBytes(enc.encode(a), enc.encode(b)));
  net(String(keys.length));
  for (const k of keys) { net(k); net(metadata[k]); }
  net(String(entries.length));
  for (const e of entries) { net(e.name); net(e.dtype); net(e.shape.join(",")); }
  parts.push(data);
  return sha256Hex(concat(parts));
}

const sortedJson = (v) => (v && typeof v === "object" && !Array.isArray(v)
  ? `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${sortedJson(v[k])}`).join(",")}}`
  : JSON.stringify(v));

/** The bytes of a checkpoint of `state` ({name: Float32Array}, in manifest order) with `shapes` and `meta`. */
export async function encodeCheckpoint(state, shapes, meta) {
  const metadata = { format: FORMAT, version: String(VERSION) };
  for (const [k, v] of Object.entries(meta)) metadata[k] = JSON_KEYS.includes(k) || typeof v !== "string" && !Number.isSafeInteger(v) ? sortedJson(v) : String(v);
  const tensors = Object.fromEntries(Object.keys(state).map((n) => [n, { dtype: "F32", shape: shapes[n], data: Float32Array.from(state[n]) }]));
  const plainBytes = encodeSafetensors(tensors, metadata);
  const { entries, start } = readSafetensorsHeader(plainBytes);
  metadata.sha256 = await checkpointDigest(metadata, entries, plainBytes.subarray(start));
  return encodeSafetensors(tensors, metadata);
}

function checkMeta(name, h) {
  const need = (ok, what) => { if (!ok) throw new CheckpointError(`checkpoint '${name}' has an invalid header: ${what}`); };
  const isInt = Number.isSafeInteger;
  need(isInt(h.step) && h.step >= 0, "'step' must be a non-negative integer");
  need(isInt(h.epoch) && h.epoch >= 0, "'epoch' must be a non-negative integer");
  const s = h.schedule;
  need(s && typeof s === "object", "'schedule' must be an object");
  need(SCHEDULES.includes(s.name), `'schedule.name' must be one of ${SCHEDULES.join(", ")}`);
  need(typeof s.lr === "number" && Number.isFinite(s.lr) && s.lr > 0, "'schedule.lr' must be a positive number");
  need(isInt(s.total_steps) && s.total_steps >= 0, "'schedule.total_steps' must be a non-negative integer");
  need(!("start_step" in s) || (isInt(s.start_step) && s.start_step >= 0 && s.start_step <= h.step),
       "'schedule.start_step' must be an integer between 0 and 'step'");
  need(h.bundle && typeof h.bundle === "object", "'bundle' must be an object");
  need(typeof h.bundle_manifest === "string", "'bundle_manifest' must be a string");
  need(isInt(h.seed) && h.seed >= 0, "'seed' must be a non-negative integer");
}

const versionError = (name, v) => new CheckpointError(`checkpoint '${name}' has format version ${JSON.stringify(v)}; this runtime reads versions ${READS.join(" and ")}`);

/** {arrays: {name: {data: Float32Array, shape}}, header} of checkpoint bytes (version 4, or 3), verified as Python verifies them. */
export async function decodeCheckpoint(bytes, name = "checkpoint") {
  const { arrays, header } = bytes[0] === 0x50 && bytes[1] === 0x4b ? await decodeV3(bytes, name) : await decodeV4(bytes, name);
  checkMeta(name, header);
  for (const [n, a] of Object.entries(arrays)) {
    if (a.kind !== "f" || a.data === null || !a.data.every(Number.isFinite)) throw new CheckpointError(`checkpoint '${name}': '${n}' is not a finite float array`);
  }
  return { arrays, header };
}

async function decodeV4(bytes, name) {
  let entries, metadata, start;
  try {
    ({ entries, metadata, start } = readSafetensorsHeader(bytes));
  } catch (e) {
    if (e instanceof SafetensorsError) throw new CheckpointError(`checkpoint '${name}' is corrupt or not an edgetl checkpoint: it ${e.message}`);
    throw e;
  }
  if (metadata.format !== FORMAT) throw new CheckpointError(`checkpoint '${name}' is not an edgetl checkpoint (its metadata lacks format '${FORMAT}')`);
  if (metadata.version !== String(VERSION)) throw versionError(name, DECIMAL.test(metadata.version ?? "") ? Number(metadata.version) : metadata.version ?? null);
  if ((await checkpointDigest(metadata, entries, bytes.subarray(start))) !== metadata.sha256) {
    throw new CheckpointError(`checkpoint '${name}' fails its checksum (corrupt or altered)`);
  }
  const header = {};
  for (const [k, v] of Object.entries(metadata)) {
    if (INT_KEYS.includes(k)) {
      if (!DECIMAL.test(v) || !Number.isSafeInteger(Number(v))) throw new CheckpointError(`checkpoint '${name}' has an invalid header: '${k}' must be a non-negative integer`);
      header[k] = Number(v);
    } else if (JSON_KEYS.includes(k)) {
      try { header[k] = JSON.parse(v); } catch { throw new CheckpointError(`checkpoint '${name}' has an invalid header: '${k}' is not JSON`); }
    } else header[k] = v;
  }
  const arrays = {};
  for (const e of entries) {
    const data = floatTensor(bytes, start, e);
    arrays[e.name] = { dtypeName: e.dtype, shape: e.shape, data, kind: data ? "f" : e.dtype };
  }
  return { arrays, header };
}

async function decodeV3(bytes, name) {
  let files;
  try {
    files = await readNpz(bytes, { maxBytes: 16 * 2 ** 30 });
  } catch (e) {
    throw new CheckpointError(`checkpoint '${name}' is corrupt (${e.message}) or not an edgetl checkpoint`);
  }
  const raw = files[HEADER];
  delete files[HEADER];
  if (!raw || raw.kind !== "U" || raw.shape.length !== 0 || raw.data[0].length > 1 << 20) {
    throw new CheckpointError(`checkpoint '${name}' is not an edgetl checkpoint (no header)`);
  }
  let tree;
  try { tree = parsePy(raw.data[0]); } catch { throw new CheckpointError(`checkpoint '${name}' has a corrupt header`); }
  const header = plain(tree);
  if (!header || typeof header !== "object" || header.version !== 3) throw versionError(name, header && typeof header === "object" ? header.version ?? null : null);
  const keys = header.keys;
  if (!keys || typeof keys !== "object" || !Object.values(keys).every((v) => typeof v === "string")) {
    throw new CheckpointError(`checkpoint '${name}' has an invalid header: 'keys' must map names to arrays`);
  }
  const vals = Object.values(keys);
  if (vals.some((k) => !(k in files)) || new Set(vals).size !== vals.length || Object.keys(files).some((k) => !vals.includes(k))) {
    throw new CheckpointError(`checkpoint '${name}' does not hold exactly the arrays its header names`);
  }
  const arrays = {};
  for (const [n, k] of Object.entries(keys)) {
    const a = files[k];
    arrays[n] = { dtypeName: DTYPE_NAMES[a.dtype] ?? a.dtype, shape: a.shape, data: a.data, kind: a.kind };
  }
  const meta = { ...tree };
  delete meta.version;
  delete meta.sha256;
  for (const [n, a] of Object.entries(arrays)) {
    if (a.kind !== "f" || a.data === null) throw new CheckpointError(`checkpoint '${name}': '${n}' is not a finite float array`);
  }
  if ((await digestV3(arrays, meta)) !== header.sha256) {
    throw new CheckpointError(`checkpoint '${name}' fails its checksum (corrupt or altered)`);
  }
  return { arrays, header };
}
