// Reading and verifying a bundle (runtime/bundle.py): the manifest is the only contract between
// host and device. Its own sha256, its structure, every file's sha256 and (with a trusted key)
// its Ed25519 signature are checked before anything is used. Files come from a `source`, an
// object with `async read(name) -> Uint8Array | null` (null: no such file), so that the same code
// reads a directory in Node (node.js: loadBundleFromDir), fetched URLs in a browser, or assets in
// React Native.
import { BundleError } from "./errors.js";
import { parsePy, plain, pyDumps } from "./pyjson.js";
import { readNpz, NpzError } from "./npz.js";
import { floatTensor, readSafetensorsHeader, SafetensorsError } from "./safetensors.js";
import { sha256Hex, verifySignature, SIGNATURE } from "./signing.js";
import { CONTRACT } from "./contract.js";
import { TARGET_NAMES, TARGET_SPECS } from "./targets.js";

export const { format: FORMAT, format_version: FORMAT_VERSION, manifest: MANIFEST, manifest_digest: MANIFEST_DIGEST } = CONTRACT.bundle;
const { max_manifest_bytes: MAX_MANIFEST_BYTES, required_fields: REQUIRED_FIELDS } = CONTRACT.bundle;
export const TARGETS = ["onnx"]; // of the contract's targets, what this runtime runs (the Python one runs all)

const short = (v, limit = 80) => {
  const s = typeof v === "string" ? `'${v}'` : JSON.stringify(v) ?? String(v);
  return s.length <= limit ? s : s.slice(0, limit - 3) + "...";
};
const isInt = (v) => Number.isSafeInteger(v);
const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
const need = (ok, what) => { if (!ok) throw new BundleError(`${MANIFEST}: ${what}`); };

/** `rel` if it names a file inside the bundle: relative, no `..`, no NUL. */
export function checkRelative(rel) {
  if (typeof rel !== "string" || !rel || rel.includes("\0") || rel.startsWith("/") || rel.startsWith("\\") ||
      /^[a-zA-Z]:/.test(rel) || rel.split(/[\\/]/).includes("..")) {
    throw new BundleError(`bundle file name ${short(rel)} is not a relative path inside the bundle`);
  }
  return rel;
}

/** sha256 of the manifest's canonical JSON without its own field, exactly as Python's json.dumps writes it. */
export async function manifestDigest(rawManifest) {
  const body = { ...rawManifest };
  delete body[MANIFEST_DIGEST];
  return sha256Hex(new TextEncoder().encode(pyDumps(body, { itemSep: ",", keySep: ":" })));
}

function checkNameMap(m, what, names) {
  need(m && typeof m === "object" && !Array.isArray(m) &&
       Object.values(m).every((v) => typeof v === "string" && v), `'${what}' must map names to strings`);
  const missing = names.filter((n) => !(n in m));
  need(!missing.length, `'${what}' lacks ${missing.slice(0, 3).map((x) => short(x)).join(", ")}`);
}

function checkTensors(entries, what) {
  need(Array.isArray(entries), `'${what}' must be a list of tensors`);
  const names = [];
  for (const t of entries) {
    need(t && typeof t === "object" && typeof t.name === "string" && t.name, `'${what}' has an entry without a name`);
    need(Array.isArray(t.shape) && t.shape.length <= 8 && t.shape.every((d) => isInt(d) && d >= 0 && d < 2 ** 31),
         `tensor ${short(t.name)} in '${what}' has an invalid shape ${short(t.shape)}`);
    names.push(t.name);
  }
  need(new Set(names).size === names.length, `'${what}' names a tensor twice`);
  return names;
}

/** The structure and types of every manifest field the runtime reads (validate_manifest in Python). */
export function validateManifest(m) {
  for (const key of REQUIRED_FIELDS) {
    need(key in m, `lacks '${key}'`);
  }
  need(typeof m.target === "string", "'target' must be a string");
  if (!TARGET_NAMES.includes(m.target)) throw new BundleError(`unknown target ${short(m.target)}; this runtime runs ${TARGETS.join(", ")}`);
  if (!TARGETS.includes(m.target)) {
    throw new BundleError(`a ${m.target} bundle cannot run in the JavaScript runtime, which runs ${TARGETS.join(", ")}; export with --target onnx`);
  }
  const inp = m.input;
  need(inp && typeof inp === "object", "'input' must be an object");
  const shape = inp.shape;
  need(Array.isArray(shape) && shape.length === 3 && shape.every((d) => isInt(d) && d >= 1 && d <= 1 << 16),
       `'input.shape' must be [channels, height, width] of positive integers, got ${short(shape)}`);
  need(isInt(inp.batch_size) && inp.batch_size >= 1 && inp.batch_size <= 1 << 20,
       `'input.batch_size' must be a positive integer, got ${short(inp.batch_size)}`);
  if ("micro_batch" in inp) { // the train_step program's samples per call; it accumulates batch_size / micro_batch calls
    need(isInt(inp.micro_batch) && inp.micro_batch >= 1 && inp.batch_size % inp.micro_batch === 0,
         `'input.micro_batch' must be a positive integer dividing input.batch_size, got ${short(inp.micro_batch)}`);
  }
  const pre = inp.preprocess;
  need(pre && typeof pre === "object", "'input.preprocess' must be an object");
  for (const k of ["mean", "std"]) {
    const v = pre[k];
    need(Array.isArray(v) && v.length === shape[0] && v.every(isNumber),
         `'input.preprocess.${k}' must be ${shape[0]} finite number(s), got ${short(v)}`);
  }
  need(pre.std.every((s) => s > 0), "'input.preprocess.std' must be positive");
  need(isInt(m.num_classes) && m.num_classes >= 1 && m.num_classes <= 1 << 24,
       `'num_classes' must be a positive integer, got ${short(m.num_classes)}`);
  const programs = m.programs;
  need(programs && typeof programs === "object" && Object.values(programs).every((v) => typeof v === "string"),
       "'programs' must map roles to file names");
  const missing = TARGET_SPECS[m.target].programs.map((p) => p.role).filter((r) => !(r in programs));
  need(!missing.length, `a ${m.target} bundle needs the program(s) ${missing.join(", ")}`);
  const trainable = checkTensors(m.trainable, "trainable");
  const opt = m.optimizer;
  need(opt && typeof opt === "object", "'optimizer' must be an object");
  need(isNumber(opt.lr) && opt.lr > 0, `'optimizer.lr' must be a positive number, got ${short(opt.lr)}`);
  const state = checkTensors(opt.state ?? [], "optimizer.state");
  need(!trainable.some((t) => state.includes(t)), "'trainable' and 'optimizer.state' share a name");
  need(typeof m.state_file === "string", "'state_file' must be a file name");
  checkNameMap(m.state_keys, "state_keys", [...trainable, ...state]);
  const io = m.io ?? {};
  need(io && typeof io === "object", "'io' must be an object");
  checkNameMap(io.params, "io.params", trainable);
  checkNameMap(io.state ?? {}, "io.state", state);
  const files = m.files;
  need(files && typeof files === "object" && !Array.isArray(files), "'files' must map file names to sha256 digests");
  for (const [rel, digest] of Object.entries(files)) {
    need(typeof digest === "string" && /^[0-9a-f]{64}$/.test(digest), `'files' gives ${short(rel)} a malformed sha256 ${short(digest)}`);
  }
  for (const rel of [...Object.values(programs), m.state_file]) {
    if (!(rel in files)) throw new BundleError(`bundle file ${short(rel)} has no checksum in the manifest`);
  }
}

/** A verified bundle: the manifest and the bytes of every file it names (all checked). */
export class Bundle {
  constructor(manifest, files) { this.manifest = manifest; this.files = files; }
  get target() { return this.manifest.target; }
  get batchSize() { return this.manifest.input.batch_size; }
  /** The samples one call of the train_step program takes (batchSize unless it accumulates micro-batches). */
  get microBatch() { return this.manifest.input.micro_batch ?? this.manifest.input.batch_size; }
  get inputShape() { return this.manifest.input.shape.slice(); }
  get numClasses() { return this.manifest.num_classes; }
  get trainable() { return this.manifest.trainable.map((t) => t.name); }
  get stateNames() { return (this.manifest.optimizer.state ?? []).map((t) => t.name); }
  /** Shapes of the trainable parameters and optimizer state, by manifest name. */
  tensorShapes() {
    return Object.fromEntries([...this.manifest.trainable, ...(this.manifest.optimizer.state ?? [])].map((t) => [t.name, t.shape.slice()]));
  }
  program(role) {
    if (!(role in this.manifest.programs)) throw new BundleError(`bundle has no '${role}' program`);
    return this.files.get(this.manifest.programs[role]);
  }

  /**
   * Initial parameters and optimizer state {name: Float32Array}, checked against the manifest: a
   * safetensors file (an npz in bundles exported before it), as runtime/state.py reads it.
   */
  async initialState() {
    const m = this.manifest;
    const shapes = this.tensorShapes();
    const bytes = this.files.get(m.state_file);
    const arrays = bytes[0] === 0x50 && bytes[1] === 0x4b ? await this.#npzState(bytes, shapes) : this.#safetensorsState(bytes, shapes);
    const state = {};
    for (const [name, shape] of Object.entries(shapes)) {
      const a = arrays[m.state_keys[name]];
      if (a.kind !== "f" || a.data === null || a.shape.length !== shape.length || a.shape.some((d, i) => d !== shape[i])) {
        throw new BundleError(`initial state '${name}' is ${a.dtype}[${a.shape.join(", ")}], the manifest says float32[${shape.join(", ")}]`);
      }
      if (!a.data.every(Number.isFinite)) throw new BundleError(`initial state '${name}' holds NaN or Inf values`);
      state[name] = Float32Array.from(a.data);
    }
    return state;
  }

  #safetensorsState(bytes, shapes) {
    const m = this.manifest;
    let entries, start;
    try {
      ({ entries, start } = readSafetensorsHeader(bytes));
    } catch (e) {
      if (e instanceof SafetensorsError) throw new BundleError(`cannot read initial state '${m.state_file}': it ${e.message}`);
      throw e;
    }
    const found = Object.fromEntries(entries.map((e) => [e.name, e]));
    const missing = Object.keys(shapes).map((n) => m.state_keys[n]).filter((k) => !Object.hasOwn(found, k));
    if (missing.length) throw new BundleError(`initial state lacks arrays ${JSON.stringify(missing.slice(0, 3))}`);
    const arrays = {};
    for (const [name, shape] of Object.entries(shapes)) {
      const e = found[m.state_keys[name]];
      // values are read only where the dtype and shape are the manifest's (data null: refused by the caller)
      const ok = e.dtype.startsWith("F") && e.shape.length === shape.length && e.shape.every((d, i) => d === shape[i]);
      arrays[m.state_keys[name]] = { dtype: e.dtype, kind: e.dtype.startsWith("F") ? "f" : e.dtype, shape: e.shape, data: ok ? floatTensor(bytes, start, e) : null };
    }
    return arrays;
  }

  async #npzState(bytes, shapes) {
    const m = this.manifest;
    const expected = Object.values(shapes).reduce((s, sh) => s + sh.reduce((a, b) => a * b, 1) * 16, 0) + 4096 * (Object.keys(shapes).length + 1);
    let arrays;
    try {
      arrays = await readNpz(bytes, { maxBytes: expected });
    } catch (e) {
      if (e instanceof NpzError) throw new BundleError(`cannot read initial state '${m.state_file}': it ${e.message}`);
      throw e;
    }
    const pickled = Object.entries(arrays).find(([, a]) => a.kind === "O");
    if (pickled) throw new BundleError(`cannot read initial state '${m.state_file}': it holds pickled objects ('${pickled[0]}'), which are refused`);
    for (const name of Object.keys(shapes)) {
      if (!arrays[m.state_keys[name]]) throw new BundleError(`initial state lacks arrays ['${m.state_keys[name]}']`);
    }
    return arrays;
  }
}

/**
 * Read and verify a bundle from `source` ({read(name)}): format, version, the manifest's own
 * sha256, its structure, every file's sha256, and with `trustedKey` (PEM text or bytes of a
 * *.pub, or the raw 32-byte key) its signature, checked before the manifest is even parsed.
 */
export async function loadBundle(source, { trustedKey = null, name = "bundle" } = {}) {
  const raw = await source.read(MANIFEST);
  if (raw == null) throw new BundleError(`'${name}' is not an edgetl bundle: no ${MANIFEST}`);
  if (raw.length > MAX_MANIFEST_BYTES) throw new BundleError(`${MANIFEST} is larger than ${MAX_MANIFEST_BYTES >> 20} MiB; not an edgetl manifest`);
  if (trustedKey != null) await verifySignature(raw, await source.read(SIGNATURE), trustedKey);
  let tree;
  try {
    tree = parsePy(new TextDecoder("utf-8", { fatal: true }).decode(raw));
  } catch (e) {
    throw new BundleError(`${MANIFEST} is not valid JSON: ${String(e.message).slice(0, 120)}`);
  }
  const manifest = plain(tree);
  if (!manifest || typeof manifest !== "object" || Array.isArray(manifest) || manifest.format !== FORMAT) {
    throw new BundleError(`${MANIFEST} is not an edgetl bundle manifest`);
  }
  if (manifest.format_version !== FORMAT_VERSION) {
    throw new BundleError(`bundle format version ${short(manifest.format_version)} is not supported (this runtime reads version ${FORMAT_VERSION}); re-export the bundle`);
  }
  if (!(MANIFEST_DIGEST in manifest)) throw new BundleError(`${MANIFEST} lacks its own checksum '${MANIFEST_DIGEST}'; re-export the bundle`);
  if (manifest[MANIFEST_DIGEST] !== (await manifestDigest(tree))) {
    throw new BundleError(`${MANIFEST} fails its sha256 check (corrupt or altered)`);
  }
  validateManifest(manifest);
  const files = new Map();
  for (const [rel, digest] of Object.entries(manifest.files)) {
    checkRelative(rel);
    const bytes = await source.read(rel);
    if (bytes == null) throw new BundleError(`bundle file ${short(rel)} is missing`);
    if ((await sha256Hex(bytes)) !== digest) throw new BundleError(`bundle file ${short(rel)} fails its sha256 check (corrupt or altered)`);
    files.set(rel, bytes);
  }
  return new Bundle(manifest, files);
}
