import assert from "node:assert/strict";
import fs from "node:fs";
import { test } from "node:test";
import { decodeCheckpoint, encodeCheckpoint } from "../src/checkpoint.js";
import { python, tmpFile } from "./fixtures.mjs";

test("a JS checkpoint passes the Python runtime's checks, with an integral learning rate too", async () => {
  const state = { w: Float32Array.of(1, 2, 3, 4, 5, 6), b: Float32Array.of(0.5) };
  const meta = { step: 3, epoch: 1, schedule: { name: "cosine", lr: 1, total_steps: 9, start_step: 0 }, seed: 2,
    bundle: { "x.onnx": "ab".repeat(32) }, bundle_manifest: "cd".repeat(32), target: "onnx" };
  const file = tmpFile("unit.ckpt");
  fs.writeFileSync(file, await encodeCheckpoint(state, { w: [2, 3], b: [] }, meta));
  const out = JSON.parse(python(["-c", `import json; from runtime.checkpoint import load_checkpoint
a, h = load_checkpoint(${JSON.stringify(file)})
print(json.dumps({"lr": repr(h["schedule"]["lr"]), "w": a["w"].tolist(), "b": a["b"].tolist()}))`]));
  assert.deepEqual(out, { lr: "1.0", w: [[1, 2, 3], [4, 5, 6]], b: 0.5 });
  const { arrays, header } = await decodeCheckpoint(fs.readFileSync(file), file);
  assert.equal(header.step, 3);
  assert.deepEqual(Array.from(arrays.w.data), [1, 2, 3, 4, 5, 6]);
});
