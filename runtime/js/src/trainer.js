// The device-side Trainer (runtime/trainer.py) on ONNX Runtime's JavaScript API. The `ort`
// module is passed in: onnxruntime-node or onnxruntime-web in Node, onnxruntime-web in a browser,
// onnxruntime-react-native on Android/iOS; nothing here uses a Node-only API.
import { Bundle, loadBundle, MANIFEST_DIGEST } from "./bundle.js";
import { decodeCheckpoint, encodeCheckpoint, SCHEDULES } from "./checkpoint.js";
import { checkImages, checkLabels, normalize } from "./data.js";
import { BundleError, CheckpointError, DivergenceError, EdgeRuntimeError, InputError } from "./errors.js";
import { externalTensors, ProtoError } from "./onnx_proto.js";
import { permutation } from "./shuffle.js";
import { CONTRACT } from "./contract.js";
import { expandNames, NAMES, programSpec } from "./targets.js";

export { SCHEDULES };
// Divergence, beyond NaN/Inf (as the Python runtime): a batch loss this many times the run's
// first (at least ln C, at least 1), or a trainable tensor this many times larger than at the start.
const { loss_growth: LOSS_GROWTH, param_growth: PARAM_GROWTH } = CONTRACT.divergence;

const now = () => (globalThis.performance ? performance.now() : Date.now());
/** Python's f"{v:.3g}" (the messages match the Python runtime's word for word). */
export function g3(v) {
  if (Number.isNaN(v)) return "nan";
  if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
  if (v === 0) return Object.is(v, -0) ? "-0" : "0";
  const [m, e] = v.toExponential(2).split("e");
  const exp = Number(e);
  const strip = (t) => (t.includes(".") ? t.replace(/0+$/, "").replace(/\.$/, "") : t);
  if (exp < -4 || exp >= 3) return `${strip(m)}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  return strip(v.toFixed(Math.max(0, 2 - exp)));
}
const pyStr = (v) => (Number.isNaN(v) ? "nan" : v === Infinity ? "inf" : v === -Infinity ? "-inf" : String(v));
const absMax = (a) => { let m = 0; for (const v of a) { const x = Math.abs(v); if (x > m || Number.isNaN(x)) m = x; } return m; };
const isInt = (v) => Number.isSafeInteger(v);
const copyState = (s) => Object.fromEntries(Object.entries(s).map(([k, v]) => [k, Float32Array.from(v)]));

function diverged(step, why, kept, lr, saved = "") {
  return `step ${step} diverged (${why}); the state is kept at step ${kept}${saved ? " and " + saved : ""}. Try a lower learning rate (now ${g3(lr)}).`;
}
function divergence(step, why, kept, lr) {
  return Object.assign(new DivergenceError(diverged(step, why, kept, lr)), { step, why, kept, lr });
}

class Guard {
  constructor(trainer) {
    this.numClasses = trainer.bundle.numClasses;
    this.trainable = trainer.bundle.trainable;
    this.limits = Object.fromEntries(this.trainable.map((t) => [t, PARAM_GROWTH * Math.max(absMax(trainer.state[t]), 1.0)]));
    this.lossLimit = null;
    this.previous = null; // [step, epoch, state] before the last good step
  }
  badLoss(loss) {
    if (!Number.isFinite(loss)) return `loss ${pyStr(loss)}`;
    if (this.lossLimit === null) this.lossLimit = LOSS_GROWTH * Math.max(loss, Math.log(Math.max(this.numClasses, 2)), 1.0);
    else if (loss > this.lossLimit) return `loss ${g3(loss)}, above ${g3(this.lossLimit)}`;
    return null;
  }
  badState(state) {
    for (const [name, v] of Object.entries(state)) if (!v.every(Number.isFinite)) return `'${name}' is not finite`;
    for (const t of this.trainable) {
      const top = absMax(state[t]);
      if (top > this.limits[t]) return `'${t}' grew to ${g3(top)}, above ${g3(this.limits[t])}`;
    }
    return null;
  }
}

/** Session options as the Python runtime sets them (runtime/backends/onnx.py: arena, patterns and reuse off). */
// extra.session.disable_quant_qdq: fold the int8 depthwise kernels to fp32 constants at load (onnxruntime's fast
// depthwise Conv needs a constant kernel; see runtime/backends/onnx.py)
// Both onnxruntime-node (1.30: IterateExtraOptions in its binding) and -web turn `extra`'s nested keys into
// session config entries ("session.disable_quant_qdq"); test/session_options.test.mjs checks the fold on node.
export const DEFAULT_SESSION_OPTIONS = { enableCpuMemArena: false, enableMemPattern: false, executionMode: "sequential", logSeverityLevel: 3, extra: { session: { disable_quant_qdq: "1" } } };

const isPlain = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

/** `over` on top of `base`, nested objects merged key by key (a caller's `extra` keeps the defaults it does not name). */
function mergeOptions(base, over) {
  const out = { ...base };
  for (const [k, v] of Object.entries(over ?? {})) out[k] = isPlain(v) && isPlain(base[k]) ? mergeOptions(base[k], v) : v;
  return out;
}

function median(a) {
  if (!a.length) return null;
  const s = [...a].sort((x, y) => x - y), h = s.length >> 1;
  return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
}

// The program roles this runtime runs, and their tensors by the contract's naming scheme (in the
// programs' order: x, y, lr, param.*, state.* in; loss, logits, new_param.*, new_state.* out).
const TRAIN = "train_step", EVAL = "eval";

function programNames(bundle) {
  const io = bundle.manifest.io;
  const params = bundle.trainable.map((t) => io.params[t]), state = bundle.stateNames.map((s) => io.state[s]);
  const train = programSpec(bundle.target, TRAIN), ev = programSpec(bundle.target, EVAL);
  return { train: expandNames(train.inputs, params, state), trainOutputs: expandNames(train.outputs, params, state),
    eval: expandNames(ev.inputs, params, state) };
}

export class Trainer {
  constructor(bundle, ort, train, evalSession, state) {
    this.bundle = bundle;
    this.names = programNames(bundle);
    this.ort = ort;
    this.train = train;
    this.evalSession = evalSession;
    this.state = state; // {manifest name: Float32Array}, trainable then optimizer state
    this.step = 0;
    this.epoch = 0;
    this.seed = 0;
    this.schedule = { name: "constant", lr: bundle.manifest.optimizer.lr, total_steps: 0 };
    this.notice = (msg) => console.warn(`edgetl.runtime: warning: ${msg}`);
    this.guard = null;
  }

  /**
   * A trainer for a bundle: `source` is a verified Bundle or a file source ({read(name)}, see
   * loadBundle). `ort` is the onnxruntime module to run it with (required).
   */
  static async load(source, { ort, trustedKey = null, sessionOptions = {}, name } = {}) {
    if (!ort || !ort.InferenceSession) throw new EdgeRuntimeError("Trainer.load needs `ort`, an onnxruntime module (onnxruntime-node, -web or -react-native)");
    const bundle = source instanceof Bundle ? source : await loadBundle(source, { trustedKey, name });
    const roles = [TRAIN, EVAL];
    for (const role of roles) {
      const file = bundle.manifest.programs[role];
      let external;
      try {
        external = externalTensors(bundle.program(role));
      } catch (e) {
        if (!(e instanceof ProtoError)) throw e;
        throw new BundleError(`cannot load the '${role}' program '${file}': it is not a valid ONNX model (${e.message})`);
      }
      if (external.length) {
        throw new BundleError(`the '${role}' program '${file}' keeps tensor '${external[0]}' in an external data file, which is refused (edgetl bundles hold every tensor in their checksummed programs)`);
      }
    }
    const state = await bundle.initialState();
    const options = mergeOptions(DEFAULT_SESSION_OPTIONS, sessionOptions);
    let train, ev;
    try {
      train = await ort.InferenceSession.create(bundle.program(TRAIN), options);
      ev = await ort.InferenceSession.create(bundle.program(EVAL), options);
    } catch (e) {
      throw new BundleError(`the onnx runtime cannot load bundle '${name ?? "bundle"}': ${String(e.message ?? e).split(/\s+/).join(" ").slice(0, 200)}`);
    }
    const names = programNames(bundle);
    const lacking = names.train.filter((n) => !train.inputNames.includes(n));
    if (lacking.length || train.outputNames.length !== names.trainOutputs.length) {
      throw new BundleError(`the manifest does not match its programs: the '${TRAIN}' program ${lacking.length ? `has no input '${lacking[0]}'` : "has other outputs than loss, logits and the new parameters and state"}`);
    }
    return new Trainer(bundle, ort, train, ev, state);
  }

  // ---- data ------------------------------------------------------------------------------
  #x(x, what = "x") { return normalize(checkImages(x, this.bundle.inputShape, what), this.bundle.manifest); }

  #batch(xs, ys, idx) {
    const per = xs.shape.slice(1).reduce((a, b) => a * b, 1);
    const bx = new Float32Array(idx.length * per), by = new BigInt64Array(idx.length);
    idx.forEach((j, i) => { bx.set(xs.data.subarray(j * per, (j + 1) * per), i * per); by[i] = ys.data[j]; });
    return [bx, by];
  }

  // ---- training ---------------------------------------------------------------------------
  lrAt(step) {
    const s = this.schedule;
    if (s.name === "cosine" && s.total_steps > 0) return s.lr * 0.5 * (1 + Math.cos(Math.PI * Math.min(step, s.total_steps) / s.total_steps));
    return s.lr;
  }

  /**
   * Train for `epochs` passes over (x, y) in shuffled full batches (the last partial batch is
   * dropped), in the Python runtime's order for the same seed. With `checkpoint` (a store: see
   * node.js fileCheckpointStore) state is saved every `checkpointEvery` steps (0: each epoch) and
   * an existing checkpoint is resumed, as Trainer.fit in Python does. `onProgress({step, total,
   * epoch, loss, lr, ms})` is called after every step. Returns {steps, losses, stepMs, finalLoss, stepMsMedian}.
   */
  async fit(x, y, { epochs = 1, lr = null, schedule = "constant", seed = 0, checkpoint = null, checkpointEvery = 0, onProgress = null } = {}) {
    const xs = this.#x(x);
    const ys = checkLabels(y, xs.shape[0], this.bundle.numClasses);
    const b = this.bundle.batchSize;
    if (xs.shape[0] < b) throw new InputError(`the bundle trains on batches of ${b}, but only ${xs.shape[0]} samples were given`);
    if (!isInt(epochs) || epochs < 1) throw new InputError(`epochs must be a positive integer, got ${epochs}`);
    if (!SCHEDULES.includes(schedule)) throw new InputError(`schedule must be one of ${SCHEDULES.join(", ")}, got ${JSON.stringify(schedule)}`);
    if (lr !== null && !(typeof lr === "number" && Number.isFinite(lr) && lr > 0)) throw new InputError(`lr must be a positive number, got ${lr}`);
    if (!isInt(seed) || seed < 0) throw new InputError(`seed must be a non-negative integer, got ${seed}`);
    if (!isInt(checkpointEvery) || checkpointEvery < 0) throw new InputError(`checkpointEvery must be a non-negative integer, got ${checkpointEvery}`);
    if (checkpoint === null && checkpointEvery) throw new InputError(`checkpointEvery=${checkpointEvery} needs a checkpoint to save to`);
    const perEpoch = Math.floor(xs.shape[0] / b);
    const existing = checkpoint ? await checkpoint.read() : [];
    if (existing.length) {
      await this.#resume(existing, perEpoch * epochs, lr, schedule, seed);
    } else {
      this.schedule = { name: schedule, lr: lr ?? this.schedule.lr, total_steps: this.step + epochs * perEpoch, start_step: this.step };
    }
    this.seed = seed;
    return this.#fit(xs, ys, perEpoch, epochs, seed, checkpoint, checkpointEvery, onProgress, existing.length > 0);
  }

  async #resume(generations, steps, lr, schedule, seed) {
    const { arrays, header, used } = await this.#readCheckpoint(generations);
    const s = { ...header.schedule };
    if (header.seed !== seed) throw new CheckpointError(`checkpoint '${used}' is of a run with seed ${header.seed}, not ${seed}; resume it with that seed, or start over with another checkpoint`);
    if (s.name !== schedule) throw new CheckpointError(`checkpoint '${used}' is of a run with the ${s.name} schedule, not ${schedule}; resume it with that schedule, or start over with another checkpoint`);
    if (lr !== null && lr !== s.lr) {
      this.notice(`resuming checkpoint '${used}' at step ${header.step} with lr ${g3(lr)} instead of its ${g3(s.lr)}`);
      s.lr = lr;
    }
    const end = (s.start_step ?? 0) + steps;
    if (end > s.total_steps) {
      if (s.name === "cosine") this.notice(`checkpoint '${used}' ends its cosine schedule at step ${s.total_steps}; it is stretched to end at step ${end}`);
      s.total_steps = end;
    }
    this.#applyCheckpoint(arrays, header);
    this.schedule = s;
  }

  async #fit(xs, ys, perEpoch, epochs, seed, checkpoint, checkpointEvery, onProgress, existed) {
    const b = this.bundle.batchSize;
    const end = this.schedule.total_steps ? this.schedule.total_steps : this.step + epochs * perEpoch;
    const start = Math.min(this.schedule.start_step ?? end - epochs * perEpoch, this.step);
    const result = { steps: this.step, losses: [], stepMs: [] };
    let saved = existed ? this.step : null;
    const save = async () => {
      if (saved !== this.step) { await checkpoint.write(await this.checkpointBytes(), { keepPrevious: true }); saved = this.step; }
    };
    this.guard = new Guard(this);
    const total = end - this.step;
    try {
      while (this.step < end) {
        const epoch = Math.floor((this.step - start) / perEpoch), offset = (this.step - start) % perEpoch;
        const order = permutation(seed + epoch, xs.shape[0]);
        for (let i = offset; i < perEpoch; i++) {
          const [bx, by] = this.#batch(xs, ys, order.subarray(i * b, (i + 1) * b));
          const { loss, ms } = await this.trainStep(bx, by);
          result.losses.push(loss);
          result.stepMs.push(ms);
          if (onProgress) onProgress({ step: this.step, total, done: result.losses.length, epoch: this.epoch, loss, lr: this.lrAt(this.step), ms });
          if (checkpoint && checkpointEvery && this.step % checkpointEvery === 0) await save();
        }
        this.epoch += 1;
        if (checkpoint && !checkpointEvery) await save();
      }
    } catch (err) {
      if (!(err instanceof DivergenceError) || !checkpoint || err.kept === undefined) throw err;
      let where;
      try {
        await checkpoint.write(await this.checkpointBytes(), { keepPrevious: saved === null || saved <= this.step });
        where = "saved to the checkpoint";
      } catch (e) {
        where = `not saved (${e.message})`;
      }
      throw new DivergenceError(diverged(err.step, err.why, err.kept, err.lr, where));
    } finally {
      this.guard = null;
    }
    if (checkpoint) await save();
    result.steps = this.step;
    result.finalLoss = result.losses.length ? result.losses[result.losses.length - 1] : null;
    result.stepMsMedian = median(result.stepMs);
    return result;
  }

  async #run(program, session, feeds, restore) {
    try {
      return await session.run(feeds);
    } catch (e) {
      if (restore) this.state = restore;
      throw new BundleError(`the onnx runtime failed to run the bundle's '${program}' program (does the manifest match its programs?): ${String(e.message ?? e).split(/\s+/).join(" ").slice(0, 300)}`);
    }
  }

  /**
   * One optimizer step on a full batch (x: Float32Array of batch*C*H*W, normalized; y: BigInt64Array):
   * one call of the train_step program, or one per micro-batch where it accumulates (it updates on
   * the last); the loss is the batch's mean, as in the Python runtime.
   */
  async trainStep(x, y) {
    const guard = this.guard ?? new Guard(this);
    const bundle = this.bundle;
    const before = this.state;
    const m = bundle.microBatch, per = x.length / bundle.batchSize;
    const lr = this.lrAt(this.step);
    let next = before, sum = 0;
    const t0 = now();
    for (let i = 0; i < bundle.batchSize; i += m) {
      const r = await this.#call(x.subarray(i * per, (i + m) * per), y.subarray(i, i + m), lr, next, before);
      sum += r.loss;
      next = r.state;
    }
    const ms = now() - t0;
    const loss = sum / (bundle.batchSize / m);
    let why = guard.badLoss(loss);
    if (why && guard.previous !== null) {
      const [step, epoch, state] = guard.previous;
      this.state = state;
      const kept = this.step;
      this.step = step; this.epoch = epoch;
      throw divergence(kept + 1, why, step, this.lrAt(step));
    }
    why = why || guard.badState(next);
    if (why) { this.state = before; throw divergence(this.step + 1, why, this.step, this.lrAt(this.step)); }
    guard.previous = [this.step, this.epoch, before];
    this.state = next;
    this.step += 1;
    return { loss, ms };
  }

  /** One call of the train_step program on m = microBatch samples from `state`: {loss, state}. */
  async #call(x, y, lr, state, restore) {
    const { Tensor } = this.ort;
    const bundle = this.bundle;
    const shapes = bundle.tensorShapes();
    const values = [
      new Tensor("float32", x, [bundle.microBatch, ...bundle.inputShape]),
      new Tensor("int64", y, [bundle.microBatch]),
      new Tensor("float32", Float32Array.of(lr), []),
      ...[...bundle.trainable, ...bundle.stateNames].map((t) => new Tensor("float32", state[t], shapes[t])),
    ];
    const feeds = Object.fromEntries(this.names.train.map((n, i) => [n, values[i]]));
    const outs = await this.#run(TRAIN, this.train, feeds, restore);
    const names = this.train.outputNames;
    const n = bundle.trainable.length;
    const next = {};
    bundle.trainable.forEach((t, i) => { next[t] = Float32Array.from(outs[names[2 + i]].data); });
    bundle.stateNames.forEach((s, i) => { next[s] = Float32Array.from(outs[names[2 + n + i]].data); });
    return { loss: Number(outs[names[0]].data[0]), state: next };
  }

  // ---- inference --------------------------------------------------------------------------
  /** Logits {data: Float32Array, shape: [N, classes]} in chunks of `chunk` samples (default: the batch). */
  async predictLogits(x, chunk = null) {
    chunk = chunk ?? this.bundle.batchSize;
    if (!isInt(chunk) || chunk < 1) throw new InputError(`chunk must be a positive integer, got ${chunk}`);
    const xs = this.#x(x);
    const { Tensor } = this.ort;
    const shapes = this.bundle.tensorShapes();
    const per = xs.shape.slice(1).reduce((a, b) => a * b, 1), n = xs.shape[0];
    const c = this.bundle.numClasses;
    const out = new Float32Array(n * c);
    for (let i = 0; i < n; i += chunk) {
      const m = Math.min(chunk, n - i);
      const values = [new Tensor("float32", xs.data.slice(i * per, (i + m) * per), [m, ...xs.shape.slice(1)]),
        ...this.bundle.trainable.map((t) => new Tensor("float32", this.state[t], shapes[t]))];
      const feeds = Object.fromEntries(this.names.eval.map((n, i) => [n, values[i]]));
      const r = await this.#run(EVAL, this.evalSession, feeds, null);
      const logits = r[NAMES.logits] ?? r[this.evalSession.outputNames[0]];
      out.set(logits.data, i * c);
    }
    return { data: out, shape: [n, c] };
  }

  /** Class ids (Int32Array) of `x`. */
  async predict(x) {
    const { data, shape: [n, c] } = await this.predictLogits(x);
    const out = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      let best = 0;
      for (let k = 1; k < c; k++) if (data[i * c + k] > data[i * c + best]) best = k;
      out[i] = best;
    }
    return out;
  }

  /** {loss, accuracy, n} on (x, y), computed in float64 as the Python runtime does. */
  async evaluate(x, y) {
    const xs = checkImages(x, this.bundle.inputShape);
    const ys = checkLabels(y, xs.shape[0], this.bundle.numClasses);
    const { data, shape: [n, c] } = await this.predictLogits(xs);
    let loss = 0, correct = 0;
    for (let i = 0; i < n; i++) {
      const row = Array.from(data.subarray(i * c, (i + 1) * c));
      const m = Math.max(...row);
      const lse = Math.log(row.reduce((s, v) => s + Math.exp(v - m), 0));
      const yi = Number(ys.data[i]);
      loss -= row[yi] - m - lse;
      let best = 0;
      for (let k = 1; k < c; k++) if (row[k] > row[best]) best = k;
      if (best === yi) correct++;
    }
    return { loss: loss / n, accuracy: correct / n, n };
  }

  // ---- state ------------------------------------------------------------------------------
  /** Trainable parameters and optimizer state, by manifest name (copies). */
  getState() { return copyState(this.state); }

  setState(state) {
    const shapes = this.bundle.tensorShapes();
    for (const [k, s] of Object.entries(shapes)) {
      const n = s.reduce((a, b) => a * b, 1);
      if (!state[k] || state[k].length !== n) throw new InputError(`state lacks '${k}' of ${n} values`);
    }
    this.state = Object.fromEntries(Object.keys(shapes).map((k) => [k, Float32Array.from(state[k])]));
  }

  /** The current state as checkpoint bytes (the Python runtime's format). */
  async checkpointBytes() {
    const meta = { step: this.step, epoch: this.epoch, schedule: this.schedule, seed: this.seed,
      bundle: this.bundle.manifest.files, bundle_manifest: this.bundle.manifest[MANIFEST_DIGEST], target: this.bundle.target };
    return encodeCheckpoint(this.state, this.bundle.tensorShapes(), meta);
  }

  async #readCheckpoint(generations) {
    let first;
    for (const g of generations) {
      try {
        const { arrays, header } = await decodeCheckpoint(g.bytes, g.name);
        if (first) this.notice(`${first.message}; using the previous checkpoint '${g.name}' (step ${header.step}) instead`);
        if (header.bundle_manifest !== this.bundle.manifest[MANIFEST_DIGEST] ||
            JSON.stringify(Object.entries(header.bundle).sort()) !== JSON.stringify(Object.entries(this.bundle.manifest.files).sort())) {
          throw new CheckpointError(`checkpoint '${g.name}' belongs to another bundle`);
        }
        const shapes = this.bundle.tensorShapes();
        const ok = Object.keys(arrays).length === Object.keys(shapes).length &&
          Object.entries(shapes).every(([k, s]) => arrays[k] && arrays[k].shape.join() === s.join() && arrays[k].shape.length === s.length);
        if (!ok) throw new CheckpointError(`checkpoint '${g.name}' does not match the bundle's tensors`);
        return { arrays, header, used: g.name };
      } catch (e) {
        if (!(e instanceof CheckpointError) || first || e.message.includes("belongs to another bundle") || e.message.includes("does not match")) throw first ?? e;
        first = e;
      }
    }
    throw first;
  }

  #applyCheckpoint(arrays, header) {
    this.state = Object.fromEntries(Object.entries(arrays).map(([k, a]) => [k, Float32Array.from(a.data)]));
    this.state = Object.fromEntries([...this.bundle.trainable, ...this.bundle.stateNames].map((k) => [k, this.state[k]]));
    this.step = header.step; this.epoch = header.epoch; this.seed = header.seed;
    this.schedule = { ...header.schedule };
  }

  /** Resume from a checkpoint store's newest readable generation, or from checkpoint bytes. */
  async loadCheckpoint(store) {
    const generations = store instanceof Uint8Array ? [{ name: "checkpoint", bytes: store }] : await store.read();
    if (!generations.length) throw new CheckpointError("the checkpoint does not exist");
    const { arrays, header } = await this.#readCheckpoint(generations);
    this.#applyCheckpoint(arrays, header);
  }
}
