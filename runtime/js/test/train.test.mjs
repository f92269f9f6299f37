// Training parity with the Python runtime (same bundle, data order, seed, cosine schedule), in
// Node native (onnxruntime-node) and Node WASM (onnxruntime-web); checkpoints across runtimes.
import assert from "node:assert/strict";
import fs from "node:fs";
import { test } from "node:test";
import { decodeCheckpoint } from "../src/checkpoint.js";
import { readSafetensorsHeader } from "../src/safetensors.js";
import { DivergenceError } from "../src/errors.js";
import { fileCheckpointStore, loadDataFile, loadTrainer } from "../src/node.js";
import { assertJsResumesPython, fixtures, maxDiff, PARITY_TOL, python, tmpFile } from "./fixtures.mjs";

const fx = fixtures();
const FIT = { epochs: 2, schedule: "cosine", seed: 5, lr: 0.05 };

/** Python's runtime fits the small set and leaves its checkpoint at `ckpt` (resuming one there). */
function pythonFit(ckpt, epochs = FIT.epochs) {
  python(["-c", `
import numpy as np
from edgetl.runtime import Trainer
d = np.load(${JSON.stringify(fx.small)})
t = Trainer.load(${JSON.stringify(fx.bundle)})
t.fit(d["x_train"], d["y_train"], epochs=${epochs}, schedule="cosine", seed=${FIT.seed}, lr=${FIT.lr}, checkpoint=${JSON.stringify(ckpt)})
`]);
  return fs.readFileSync(ckpt);
}

const pyRef = tmpFile("py.ckpt");
let pyState;
async function pythonState() {
  if (!pyState) {
    const { arrays, header } = await decodeCheckpoint(pythonFit(pyRef), pyRef);
    assert.equal(header.step, 10);
    pyState = Object.fromEntries(Object.entries(arrays).map(([k, a]) => [k, a.data]));
  }
  return pyState;
}

for (const backend of ["node", "web"]) {
  test(`fit on onnxruntime-${backend} gives the Python runtime's parameters after 10 steps`, async () => {
    const d = await loadDataFile(fx.small);
    const t = await loadTrainer(fx.bundle, { backend });
    const before = t.getState();
    const r = await t.fit(d.x_train, d.y_train, FIT);
    assert.equal(r.steps, 10);
    const py = await pythonState();
    assert.ok(maxDiff(before, py) > 1e-3, "training changed nothing: the comparison would be empty");
    const diff = maxDiff(t.getState(), py);
    assert.ok(diff <= PARITY_TOL, `max |js - python| = ${diff}`);
  });
}

test("a JS checkpoint resumes in Python, and a Python checkpoint in JS, to the same parameters", async () => {
  const d = await loadDataFile(fx.small);
  const stateOf = async (bytes, name) => Object.fromEntries(Object.entries((await decodeCheckpoint(bytes, name)).arrays).map(([k, a]) => [k, a.data]));
  // the reference: Python trains one epoch, then resumes its checkpoint for a second (the cosine
  // schedule is stretched on resume, in both runtimes)
  const refCkpt = tmpFile("ref.ckpt");
  pythonFit(refCkpt, 1);
  const pyOne = fs.readFileSync(refCkpt);
  const ref = await stateOf(pythonFit(refCkpt, 2), refCkpt);
  // JS trains the first epoch; Python resumes it
  const jsCkpt = tmpFile("js.ckpt");
  const t = await loadTrainer(fx.bundle);
  await t.fit(d.x_train, d.y_train, { ...FIT, epochs: 1, checkpoint: fileCheckpointStore(jsCkpt) });
  assert.equal(t.step, 5);
  assert.ok(maxDiff(await stateOf(fs.readFileSync(jsCkpt), jsCkpt), await stateOf(pyOne, "py")) <= PARITY_TOL);
  assert.ok(maxDiff(await stateOf(pythonFit(jsCkpt), jsCkpt), ref) <= PARITY_TOL);
  // Python's first epoch; JS resumes it
  await assertJsResumesPython(fx.bundle, pyOne, d, FIT, ref);
});

test("a run interrupted mid-epoch resumes from its checkpoint to the Python runtime's parameters", async () => {
  const d = await loadDataFile(fx.small);
  const ckpt = tmpFile("mid.ckpt");
  let t = await loadTrainer(fx.bundle);
  const stop = ({ step }) => { if (step === 7) throw new Error("interrupted"); };
  await assert.rejects(t.fit(d.x_train, d.y_train, { ...FIT, checkpoint: fileCheckpointStore(ckpt), checkpointEvery: 3, onProgress: stop }), /interrupted/);
  t = await loadTrainer(fx.bundle);
  const r = await t.fit(d.x_train, d.y_train, { ...FIT, checkpoint: fileCheckpointStore(ckpt), checkpointEvery: 3 });
  assert.equal(r.losses.length, 4, "resumed at step 6 of 10");
  assert.ok(maxDiff(t.getState(), await pythonState()) <= PARITY_TOL);
});

test("an AdamW bundle (a 0-d step counter) trains to the Python runtime's parameters, and Python reads its checkpoint", async () => {
  const d = await loadDataFile(fx.small);
  const jsCkpt = tmpFile("adamw-js.ckpt"), pyCkpt = tmpFile("adamw-py.ckpt");
  const t = await loadTrainer(fx.adamw);
  await t.fit(d.x_train, d.y_train, { ...FIT, checkpoint: fileCheckpointStore(jsCkpt) });
  const out = JSON.parse(python(["-c", `import json
import numpy as np
from edgetl.runtime import Trainer
from runtime.checkpoint import load_checkpoint
d = np.load(${JSON.stringify(fx.small)})
t = Trainer.load(${JSON.stringify(fx.adamw)})
t.fit(d["x_train"], d["y_train"], epochs=${FIT.epochs}, schedule="cosine", seed=${FIT.seed}, lr=${FIT.lr}, checkpoint=${JSON.stringify(pyCkpt)})
a, _ = load_checkpoint(${JSON.stringify(pyCkpt)})
b, h = load_checkpoint(${JSON.stringify(jsCkpt)})
print(json.dumps({"diff": max(float(np.abs(a[k] - b[k]).max()) for k in a), "step": b["step"].tolist(), "shape": list(b["step"].shape), "moved": float(np.abs(a["head.bias"] - t.bundle.initial_state()["head.bias"]).max())}))`]));
  assert.deepEqual([out.step, out.shape], [10, []]);
  assert.ok(out.moved > 1e-3, "training changed nothing: the comparison would be empty");
  assert.ok(out.diff <= PARITY_TOL, `max |js - python| = ${out.diff}`);
});

test("a checkpoint of another seed, or one altered, is refused", async () => {
  const d = await loadDataFile(fx.small);
  const ckpt = tmpFile("seed.ckpt");
  let t = await loadTrainer(fx.bundle);
  await t.fit(d.x_train, d.y_train, { ...FIT, epochs: 1, checkpoint: fileCheckpointStore(ckpt) });
  t = await loadTrainer(fx.bundle);
  await assert.rejects(t.fit(d.x_train, d.y_train, { ...FIT, seed: 6, checkpoint: fileCheckpointStore(ckpt) }), /is of a run with seed 5, not 6/);
  // a value changed in a well-formed file: only the checkpoint's sha256 can tell
  const bytes = fs.readFileSync(ckpt);
  const { entries, start } = readSafetensorsHeader(bytes);
  const view = new DataView(bytes.buffer, bytes.byteOffset + start + entries[0].begin, 4);
  view.setFloat32(0, view.getFloat32(0, true) + 1e-3, true);
  fs.writeFileSync(ckpt, bytes);
  await assert.rejects(t.loadCheckpoint(fileCheckpointStore(ckpt)), /checkpoint '.*seed.ckpt' fails its checksum \(corrupt or altered\)/);
});

test("a diverging run stops with the Python runtime's message and keeps the last good state", async () => {
  const d = await loadDataFile(fx.small);
  for (const lr of [1e2, 1e4]) {
    const py = python(["-c", `
import numpy as np
from edgetl.runtime import Trainer
d = np.load(${JSON.stringify(fx.small)})
t = Trainer.load(${JSON.stringify(fx.bundle)})
try:
    t.fit(d["x_train"], d["y_train"], epochs=2, lr=${lr}, seed=1)
except Exception as e:
    print(type(e).__name__, e)
`]).trim();
    const t = await loadTrainer(fx.bundle);
    const start = t.getState();
    const err = await t.fit(d.x_train, d.y_train, { epochs: 2, lr, seed: 1 }).then(() => null, (e) => e);
    assert.ok(err instanceof DivergenceError, String(err));
    assert.equal(`${err.name} ${err.message}`, py);
    assert.equal(t.step, 0);
    assert.equal(maxDiff(t.getState(), start), 0);
  }
});

test("bad data is refused with the Python runtime's messages", async () => {
  const d = await loadDataFile(fx.small);
  const t = await loadTrainer(fx.bundle);
  await assert.rejects(t.fit({ data: new Float32Array(10), shape: [10, 1] }, d.y_train), /x must have shape \(N, 1, 28, 28\), got \(10, 1\)/);
  const big = { data: d.x_train.data.map((v) => v * 255), shape: d.x_train.shape };
  await assert.rejects(t.fit(big, d.y_train), /x must be scaled to \[0, 1\]/);
  const y = { data: d.y_train.data.map(() => 10n), shape: d.y_train.shape };
  await assert.rejects(t.fit(d.x_train, y), /y has class ids outside \[0, 9\]/);
  await assert.rejects(t.fit(d.x_train, d.y_train, { epochs: 0 }), /epochs must be a positive integer/);
});

test("two epochs on digits reach at least 95% test accuracy (onnxruntime-node)", async () => {
  const d = await loadDataFile(fx.data);
  const t = await loadTrainer(fx.bundle);
  await t.fit(d.x_train, d.y_train, { epochs: 2, schedule: "cosine" });
  const r = await t.evaluate(d.x_test, d.y_test);
  assert.ok(r.accuracy >= 0.95, `test accuracy ${r.accuracy}`);
  const pred = await t.predict(d.x_test);
  assert.equal(pred.length, 540);
});
