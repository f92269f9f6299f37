// @edgetl/runtime: train an edgetl bundle on the device with ONNX Runtime's JavaScript API.
// Browser-safe: no Node API here (see node.js for the file-system helpers).
export { Trainer, SCHEDULES, DEFAULT_SESSION_OPTIONS } from "./trainer.js";
export { Bundle, loadBundle, validateManifest, manifestDigest, MANIFEST, FORMAT_VERSION } from "./bundle.js";
export { CONTRACT } from "./contract.js";
export { encodeCheckpoint, decodeCheckpoint, checkpointDigest } from "./checkpoint.js";
export { encodeSafetensors, readSafetensorsHeader, floatTensor, SafetensorsError } from "./safetensors.js";
export { checkImages, checkLabels, normalize, datasetFromNpz } from "./data.js";
export { readNpz, NpzError } from "./npz.js";
export { permutation, PCG64 } from "./shuffle.js";
export { verifySignature, sha256Hex, SigningKeyError } from "./signing.js";
import { BundleError } from "./errors.js";
export { EdgeRuntimeError, BundleError, InputError, CheckpointError, DivergenceError } from "./errors.js";

/** A bundle source over fetch(): files are `${baseUrl}/${name}` (a browser, or a CDN). */
export function fetchSource(baseUrl, { fetch: f = globalThis.fetch } = {}) {
  const base = baseUrl.endsWith("/") ? baseUrl : baseUrl + "/";
  return {
    async read(name) {
      const r = await f(base + name);
      if (r.status === 404) return null;
      if (!r.ok) throw new BundleError(`cannot fetch ${base + name}: HTTP ${r.status}`);
      return new Uint8Array(await r.arrayBuffer());
    },
  };
}
