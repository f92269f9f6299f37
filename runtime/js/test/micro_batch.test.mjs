// Micro-batch bundles (input.micro_batch, BUNDLE.md): the JS Trainer makes the Python runtime's calls
// (batch_size / micro_batch per optimizer step), reports the batch's mean loss, and its checkpoints
// (accum:* and micro_step state included) resume in Python and the other way round.
import assert from "node:assert/strict";
import fs from "node:fs";
import { test } from "node:test";
import { decodeCheckpoint } from "../src/checkpoint.js";
import { fileCheckpointStore, loadDataFile, loadTrainer } from "../src/node.js";
import { assertJsResumesPython, fixtures, maxDiff, PARITY_TOL, python, tmpFile } from "./fixtures.mjs";

const fx = fixtures();
const FIT = { epochs: 2, schedule: "cosine", seed: 5, lr: 0.05 };

/** The Python runtime fits the small set on the micro-batch bundle, resuming `ckpt` if it holds one:
 * {losses, state (by manifest name)} of the run, its checkpoint left at `ckpt`. */
function pythonFit(ckpt, epochs = FIT.epochs) {
  const out = JSON.parse(python(["-c", `import json
import numpy as np
from edgetl.runtime import Trainer
d = np.load(${JSON.stringify(fx.small)})
t = Trainer.load(${JSON.stringify(fx.micro)})
r = t.fit(d["x_train"], d["y_train"], epochs=${epochs}, schedule="cosine", seed=${FIT.seed}, lr=${FIT.lr}, checkpoint=${JSON.stringify(ckpt)})
print(json.dumps({"losses": r.losses, "state": {k: v.ravel().tolist() for k, v in t.get_state().items()}}))`]));
  return out;
}

const stateOf = async (path) => Object.fromEntries(Object.entries((await decodeCheckpoint(fs.readFileSync(path), path)).arrays).map(([k, a]) => [k, a.data]));

let ref;
const pythonRef = () => (ref ??= pythonFit(tmpFile("py.ckpt")));

for (const backend of ["node", "web"]) {
  test(`a micro-batch bundle fits on onnxruntime-${backend} to the Python runtime's parameters and losses`, async () => {
    const d = await loadDataFile(fx.small);
    const t = await loadTrainer(fx.micro, { backend });
    assert.deepEqual([t.bundle.batchSize, t.bundle.microBatch], [32, 8]);
    assert.ok(t.bundle.stateNames.includes("micro_step"));
    const before = t.getState();
    const r = await t.fit(d.x_train, d.y_train, FIT);
    assert.equal(r.steps, 10, "one optimizer step per batch of 32, not per call of 8");
    const py = pythonRef();
    assert.ok(maxDiff(before, py.state) > 1e-3, "training changed nothing: the comparison would be empty");
    const diff = maxDiff(t.getState(), py.state);
    assert.ok(diff <= PARITY_TOL, `max |js - python| = ${diff}`);
    assert.equal(r.losses.length, 10);
    r.losses.forEach((l, i) => assert.ok(Math.abs(l - py.losses[i]) <= 1e-5, `loss ${i}: ${l} vs ${py.losses[i]}`));
    // every optimizer step ends on an update: nothing is left accumulated between batches
    assert.equal(t.getState().micro_step[0], 0);
    assert.ok(t.bundle.trainable.every((p) => t.getState()[`accum:${p}`].every((v) => v === 0)));
  });
}

test("micro-batches of the step equal whole batches: the micro-batch bundle trains to the whole-batch bundle's parameters", async () => {
  const d = await loadDataFile(fx.small);
  const micro = await loadTrainer(fx.micro), whole = await loadTrainer(fx.bundle);
  await micro.fit(d.x_train, d.y_train, FIT);
  await whole.fit(d.x_train, d.y_train, FIT);
  const a = micro.getState(), b = whole.getState();
  const params = Object.fromEntries(micro.bundle.trainable.map((p) => [p, a[p]]));
  const diff = maxDiff(params, Object.fromEntries(whole.bundle.trainable.map((p) => [p, b[p]])));
  assert.ok(diff <= 1e-4, `max |micro - whole| = ${diff}`);
});

test("a micro-batch bundle's checkpoints resume across the JS and Python runtimes", async () => {
  const d = await loadDataFile(fx.small);
  // the reference: Python trains one epoch, then resumes its checkpoint for a second (the cosine
  // schedule is stretched on resume, in both runtimes)
  const refCkpt = tmpFile("ref.ckpt");
  pythonFit(refCkpt, 1);
  const pyOne = fs.readFileSync(refCkpt);
  const ref = pythonFit(refCkpt).state;
  // JS trains the first epoch (its checkpoint holds accum:* and micro_step); Python resumes it
  const jsCkpt = tmpFile("js.ckpt");
  const t = await loadTrainer(fx.micro);
  await t.fit(d.x_train, d.y_train, { ...FIT, epochs: 1, checkpoint: fileCheckpointStore(jsCkpt) });
  const saved = await stateOf(jsCkpt);
  assert.ok("micro_step" in saved && t.bundle.trainable.every((p) => `accum:${p}` in saved));
  const resumed = pythonFit(jsCkpt);
  assert.equal(resumed.losses.length, 5, "the resumed run takes the remaining 5 steps only");
  assert.ok(maxDiff(resumed.state, ref) <= PARITY_TOL);
  // Python's first epoch; JS resumes it
  await assertJsResumesPython(fx.micro, pyOne, d, FIT, ref);
});
