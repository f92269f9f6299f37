// The thin Node layer: bundles from a directory, data from an .npz file, checkpoints as files
// (atomic replace, the previous generation kept as FILE.prev, as runtime/checkpoint.py does), and
// the onnxruntime module to use. Everything else is the browser-safe core.
import fs from "node:fs";
import path from "node:path";
import { BundleError, CheckpointError, InputError } from "./errors.js";
import { loadBundle } from "./bundle.js";
import { datasetFromNpz } from "./data.js";
import { readNpz, NpzError } from "./npz.js";
import { Trainer } from "./trainer.js";

/** A bundle source reading files under `dir`, refusing any that resolves outside it (symlinks too). */
export function dirSource(dir) {
  return {
    async read(rel) {
      const base = fs.realpathSync(dir);
      const p = path.resolve(base, rel);
      if (!fs.existsSync(p)) return null;
      const real = fs.realpathSync(p);
      if (!real.startsWith(base + path.sep)) throw new BundleError(`bundle file '${rel}' points outside the bundle directory`);
      if (!fs.statSync(real).isFile()) return null;
      return new Uint8Array(fs.readFileSync(real));
    },
  };
}

/** Read and verify the bundle in directory `dir`. */
export async function loadBundleFromDir(dir, { trustedKey = null } = {}) {
  if (!fs.existsSync(dir)) throw new BundleError(`bundle directory '${dir}' does not exist`);
  if (!fs.statSync(dir).isDirectory()) throw new BundleError(`bundle '${dir}' is a file, not a directory`);
  if (typeof trustedKey === "string" && !trustedKey.includes("BEGIN")) trustedKey = readKey(trustedKey);
  return loadBundle(dirSource(dir), { trustedKey, name: dir });
}

function readKey(file) {
  try { return fs.readFileSync(file); } catch (e) { throw new BundleError(`cannot read trusted key '${file}': ${e.code ?? e.message}`); }
}

/** The onnxruntime module: "node" (onnxruntime-node, native) or "web" (onnxruntime-web, WASM). */
export async function ortModule(kind = "node") {
  if (kind === "node") return import("onnxruntime-node");
  if (kind === "web") {
    const ort = await import("onnxruntime-web");
    ort.env.wasm.numThreads = 1; // no worker threads in Node; a browser may raise it
    return ort;
  }
  throw new InputError(`the onnxruntime backend must be "node" or "web", got ${JSON.stringify(kind)}`);
}

/** Trainer.load for a bundle directory, run by onnxruntime-node ("node") or onnxruntime-web's WASM ("web"). */
export async function loadTrainer(dir, { backend = "node", trustedKey = null, sessionOptions = {} } = {}) {
  const bundle = await loadBundleFromDir(dir, { trustedKey });
  return Trainer.load(bundle, { ort: await ortModule(backend), sessionOptions, name: dir });
}

/** A dataset file as written by `edgetl data` (x_train, y_train, x_test, y_test; no pickles). */
export async function loadDataFile(file) {
  if (!fs.existsSync(file)) throw new InputError(`data file '${file}' does not exist`);
  if (!fs.statSync(file).isFile()) throw new InputError(`data file '${file}' is not a file`);
  try {
    return datasetFromNpz(await readNpz(new Uint8Array(fs.readFileSync(file))), `data file '${file}'`);
  } catch (e) {
    if (e instanceof NpzError) throw new InputError(`data file '${file}' ${e.message}`);
    throw e;
  }
}

/**
 * A checkpoint store on a file: read() gives [newest, previous] generations that exist; write()
 * writes a temporary file, fsyncs it, keeps the current file as FILE.prev (unless told not to)
 * and renames the new one over it, so a crash leaves a readable checkpoint. (No lock file as in
 * Python: Node has no flock; do not run two fits on one checkpoint.)
 */
export function fileCheckpointStore(file) {
  const prev = file + ".prev";
  return {
    file,
    async read() {
      const out = [];
      for (const name of [file, prev]) {
        if (name === prev && !out.length && !fs.existsSync(file)) break; // a .prev without its newest is a stale run's
        try {
          if (fs.statSync(name).isFile()) out.push({ name, bytes: new Uint8Array(fs.readFileSync(name)) });
        } catch (e) {
          if (e.code !== "ENOENT") throw new CheckpointError(`cannot read checkpoint '${name}': ${e.code}`);
        }
      }
      return out;
    },
    async write(bytes, { keepPrevious = true } = {}) {
      const dir = path.dirname(path.resolve(file));
      const tmp = path.join(dir, `${path.basename(file)}.${process.pid}.${Date.now()}.tmp`);
      try {
        fs.mkdirSync(dir, { recursive: true });
        const first = !fs.existsSync(file);
        const fd = fs.openSync(tmp, "w");
        try { fs.writeSync(fd, bytes); fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
        if (keepPrevious && !first) fs.copyFileSync(file, prev);
        fs.renameSync(tmp, file);
        if (first) fs.rmSync(prev, { force: true });
        try { const d = fs.openSync(dir, "r"); fs.fsyncSync(d); fs.closeSync(d); } catch { /* best effort */ }
      } catch (e) {
        fs.rmSync(tmp, { force: true });
        throw new CheckpointError(`cannot write checkpoint '${file}': ${e.code ?? e.message}; ${fs.existsSync(file) ? "the previous checkpoint is intact" : "no checkpoint was written"}`);
      }
    },
  };
}
