// Checking what a user hands to fit/evaluate/predict (runtime/data.py), before anything touches
// the model. Arrays are {data: TypedArray, shape: number[]} (what readNpz returns).
import { InputError } from "./errors.js";

const fmt = (n) => Number(n.toPrecision(3)).toString();

/** float images in [0, 1], NCHW with the bundle's (C, H, W); returned as {data: Float32Array, shape}. */
export function checkImages(x, shape, what = "x") {
  if (!x || typeof x !== "object" || !ArrayBuffer.isView(x.data) || !Array.isArray(x.shape)) {
    throw new InputError(`${what} must be an array {data: TypedArray, shape}, got ${x === null ? "null" : typeof x}`);
  }
  if (!(x.data instanceof Float32Array || x.data instanceof Float64Array)) {
    throw new InputError(`${what} must hold floating-point images in [0, 1], got ${x.data.constructor.name}`);
  }
  if (x.shape.length !== 4 || x.shape.slice(1).some((d, i) => d !== shape[i])) {
    throw new InputError(`${what} must have shape (N, ${shape.join(", ")}), got (${x.shape.join(", ")})`);
  }
  if (x.shape.reduce((a, b) => a * b, 1) !== x.data.length) {
    throw new InputError(`${what} has ${x.data.length} values, not the ${x.shape.join("x")} of its shape`);
  }
  if (x.shape[0] === 0) throw new InputError(`${what} is empty`);
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < x.data.length; i++) {
    const v = x.data[i];
    if (!Number.isFinite(v)) throw new InputError(`${what} contains NaN or Inf values`);
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (lo < -1e-3 || hi > 1 + 1e-3) throw new InputError(`${what} must be scaled to [0, 1], got values in [${fmt(lo)}, ${fmt(hi)}]`);
  return { data: x.data instanceof Float32Array ? x.data : Float32Array.from(x.data), shape: x.shape.slice() };
}

/** integer class ids in [0, numClasses), one per image; returned as {data: BigInt64Array, shape}. */
export function checkLabels(y, n, numClasses, what = "y") {
  if (!y || typeof y !== "object" || !ArrayBuffer.isView(y.data) || !Array.isArray(y.shape)) {
    throw new InputError(`${what} must be an array {data: TypedArray, shape}, got ${y === null ? "null" : typeof y}`);
  }
  const ints = [Int8Array, Int16Array, Int32Array, Uint8Array, Uint16Array, Uint32Array, BigInt64Array, BigUint64Array];
  if (!ints.some((C) => y.data instanceof C)) throw new InputError(`${what} must hold integer class ids, got ${y.data.constructor.name}`);
  if (y.shape.length !== 1) throw new InputError(`${what} must be 1-D, got shape (${y.shape.join(", ")})`);
  if (y.shape[0] !== n || y.data.length !== n) throw new InputError(`x and ${what} have different lengths (${n} vs ${y.data.length})`);
  const out = new BigInt64Array(n);
  let lo = Infinity, hi = -Infinity;
  for (let i = 0; i < n; i++) {
    const v = Number(y.data[i]);
    if (v < lo) lo = v;
    if (v > hi) hi = v;
    out[i] = BigInt(y.data[i]);
  }
  if (n && (lo < 0 || hi >= numClasses)) {
    throw new InputError(`${what} has class ids outside [0, ${numClasses - 1}] (min ${lo}, max ${hi})`);
  }
  return { data: out, shape: [n] };
}

/** (x - mean) / std per channel, in float32 as numpy computes it. */
export function normalize(x, manifest) {
  const { mean, std } = manifest.input.preprocess;
  const [n, c, h, w] = x.shape;
  const hw = h * w;
  const out = new Float32Array(x.data.length);
  const m = Float32Array.from(mean), s = Float32Array.from(std);
  for (let i = 0; i < n; i++)
    for (let k = 0; k < c; k++) {
      const base = (i * c + k) * hw;
      for (let j = 0; j < hw; j++) out[base + j] = Math.fround(Math.fround(x.data[base + j] - m[k]) / s[k]);
    }
  return { data: out, shape: x.shape.slice() };
}

export const NPZ_KEYS = ["x_train", "y_train", "x_test", "y_test"];

/** A dataset as written by `edgetl data` (x_train, y_train, x_test, y_test), from readNpz's arrays. */
export function datasetFromNpz(arrays, name = "data file") {
  const pickled = NPZ_KEYS.find((k) => arrays[k] && arrays[k].kind === "O");
  if (pickled) throw new InputError(`${name} holds pickled objects ('${pickled}'), which are refused`);
  const missing = NPZ_KEYS.filter((k) => !arrays[k]);
  if (missing.length) throw new InputError(`${name} lacks ${missing.join(", ")}`);
  const out = {};
  for (const k of NPZ_KEYS) {
    if (arrays[k].data === null) throw new InputError(`${name}: '${k}' has dtype ${arrays[k].dtype}, which is not numeric`);
    out[k] = { data: arrays[k].data, shape: arrays[k].shape };
  }
  return out;
}
