// Checkpoints in the Python runtime's format (runtime/checkpoint.py, version 3), so that Python
// and JavaScript resume each other's: an uncompressed .npz with `__header__` (a 0-d numpy unicode
// string holding JSON: version, step, epoch, schedule, seed, bundle, bundle_manifest, target, keys,
// sha256) and one float32 array per tensor (`a0`, `a1`, ... as `keys` maps them). The sha256 covers
// json.dumps(meta, sort_keys=True) and every array's name, dtype, shape and bytes. Here only the
// bytes are made and checked; where they are stored (a file with a previous generation in Node,
// IndexedDB in a browser) is the store's job (node.js: fileCheckpointStore).
import { CheckpointError } from "./errors.js";
import { npyFloat32, npyString, readNpz, writeZip } from "./npz.js";
import { parsePy, plain, pyDumps, PyFloat } from "./pyjson.js";
import { sha256Hex } from "./signing.js";

export const VERSION = 3;
const HEADER = "__header__";
const SCHEDULES = ["constant", "cosine"];
const DTYPE_NAMES = { "<f4": "float32", "<f8": "float64", "|f1": "float8" };

// str(np.ascontiguousarray(a).shape) as Python's digest writes it: ascontiguousarray makes a 0-d
// array (AdamW's step counter) 1-d, so "()" never occurs there.
const pyShape = (s) => (s.length <= 1 ? `(${s.length ? s[0] : 1},)` : `(${s.join(", ")})`);

async function digest(arrays, metaTree) {
  const enc = new TextEncoder();
  const parts = [enc.encode(pyDumps(metaTree))];
  for (const k of Object.keys(arrays).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))) {
    const a = arrays[k];
    parts.push(enc.encode(k), enc.encode(a.dtypeName + pyShape(a.shape)));
    parts.push(new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength));
  }
  const all = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) { all.set(p, o); o += p.length; }
  return sha256Hex(all);
}

/** meta's float fields as Python floats (the digest depends on "0.1" vs "1.0" vs "1"). */
function metaTree(meta) {
  const s = meta.schedule;
  return { ...meta, schedule: { ...s, lr: new PyFloat(s.lr) } };
}

/** The bytes of a checkpoint of `state` ({name: Float32Array}, in manifest order) with `shapes` and `meta`. */
export async function encodeCheckpoint(state, shapes, meta) {
  const names = Object.keys(state);
  const keys = Object.fromEntries(names.map((n, i) => [n, `a${i}`]));
  const arrays = Object.fromEntries(names.map((n) => [n, { dtypeName: "float32", shape: shapes[n], data: Float32Array.from(state[n]) }]));
  const tree = { ...metaTree(meta), keys };
  const header = { version: VERSION, ...tree, sha256: await digest(arrays, tree) };
  const members = { [`${HEADER}.npy`]: npyString(pyDumps(header)) };
  for (const n of names) members[`${keys[n]}.npy`] = npyFloat32(arrays[n].data, arrays[n].shape);
  return writeZip(members);
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

/** {arrays: {name: {data: Float32Array, shape}}, header} of checkpoint bytes, verified as Python verifies them. */
export async function decodeCheckpoint(bytes, name = "checkpoint") {
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
  if (!header || typeof header !== "object" || header.version !== VERSION) {
    throw new CheckpointError(`checkpoint '${name}' has format version ${JSON.stringify(header && header.version)}; this runtime reads version ${VERSION}`);
  }
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
  if ((await digest(arrays, meta)) !== header.sha256) {
    throw new CheckpointError(`checkpoint '${name}' fails its checksum (corrupt or altered)`);
  }
  checkMeta(name, header);
  for (const [n, a] of Object.entries(arrays)) {
    if (a.kind !== "f" || !a.data.every(Number.isFinite)) throw new CheckpointError(`checkpoint '${name}': '${n}' is not a finite float array`);
  }
  return { arrays, header };
}
