import assert from "node:assert/strict";
import fs from "node:fs";
import { test } from "node:test";
import { CheckpointError } from "../src/errors.js";
import { decodeCheckpoint, encodeCheckpoint } from "../src/checkpoint.js";
import { encodeSafetensors, floatTensor, readSafetensorsHeader, SafetensorsError } from "../src/safetensors.js";
import { python, tmpFile } from "./fixtures.mjs";

const META = { step: 3, epoch: 1, schedule: { name: "cosine", lr: 1, total_steps: 9, start_step: 0 }, seed: 2,
  bundle: { "x.onnx": "ab".repeat(32) }, bundle_manifest: "cd".repeat(32), target: "onnx" };
const STATE = { w: Float32Array.of(1, 2, 3, 4, 5, 6), b: Float32Array.of(0.5) };
const SHAPES = { w: [2, 3], b: [] };

test("a JS checkpoint passes the Python runtime's checks, with an integral learning rate and non-ASCII keys", async () => {
  // U+FFFF sorts after U+10000 in UTF-16 (JS's default order) but before it in UTF-8: the digest uses UTF-8
  const meta = { ...META, "x\uffff": "a", "x\u{10000}": "b" };
  const file = tmpFile("unit.ckpt");
  fs.writeFileSync(file, await encodeCheckpoint(STATE, SHAPES, meta));
  const out = JSON.parse(python(["-c", `import json; from runtime.checkpoint import load_checkpoint
a, h = load_checkpoint(${JSON.stringify(file)})
print(json.dumps({"v": h["version"], "lr": repr(h["schedule"]["lr"]), "w": a["w"].tolist(), "b": a["b"].tolist()}))`]));
  assert.deepEqual(out, { v: 4, lr: "1.0", w: [[1, 2, 3], [4, 5, 6]], b: 0.5 });
  const { arrays, header } = await decodeCheckpoint(fs.readFileSync(file), file);
  assert.equal(header.step, 3);
  assert.equal(header.version, 4);
  assert.deepEqual(Array.from(arrays.w.data), [1, 2, 3, 4, 5, 6]);
});

test("checkpoints Python wrote, version 4 and version 3, are read here", async () => {
  const v4 = tmpFile("py4.ckpt"), v3 = tmpFile("py3.ckpt");
  python(["-c", `import sys, numpy as np; sys.path.insert(0, "tests")
from runtime.checkpoint import save_checkpoint
from state_files import v3_of
meta = {"step": 3, "epoch": 1, "schedule": {"name": "cosine", "lr": 0.1, "total_steps": 9, "start_step": 0}, "seed": 2,
        "bundle": {"x.onnx": "ab" * 32}, "bundle_manifest": "cd" * 32, "target": "onnx"}
save_checkpoint(${JSON.stringify(v4)}, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(2, np.float32)}, meta)
v3_of(${JSON.stringify(v4)}, ${JSON.stringify(v3)})`]);
  for (const [file, version] of [[v4, 4], [v3, 3]]) {
    const { arrays, header } = await decodeCheckpoint(new Uint8Array(fs.readFileSync(file)), file);
    assert.equal(header.version, version);
    assert.deepEqual([header.step, header.epoch, header.seed, header.schedule.lr], [3, 1, 2, 0.1]);
    assert.deepEqual(Array.from(arrays.w.data), [0, 1, 2, 3, 4, 5]);
    assert.deepEqual(arrays.s.shape, []);
  }
});

test("a truncated, altered or foreign checkpoint is refused", async () => {
  const good = await encodeCheckpoint(STATE, SHAPES, META);
  const refused = async (bytes, re) => assert.rejects(decodeCheckpoint(bytes, "c"), (e) => e instanceof CheckpointError && re.test(e.message));
  await refused(good.subarray(0, 5), /^checkpoint 'c' is corrupt or not an edgetl checkpoint: it is truncated/);
  await refused(good.subarray(0, good.length - 2), /declares \d+ bytes of tensor data but holds/);
  const long = good.slice();
  new DataView(long.buffer).setBigUint64(0, BigInt(good.length), true);
  await refused(long, /declares a header of \d+ bytes, beyond the file's/);
  const flipped = good.slice();
  flipped[flipped.length - 1] ^= 1;
  await refused(flipped, /^checkpoint 'c' fails its checksum \(corrupt or altered\)$/);
  const { metadata } = readSafetensorsHeader(good);
  const tensors = { w: { dtype: "F32", shape: [2, 3], data: STATE.w }, b: { dtype: "F32", shape: [], data: STATE.b } };
  await refused(encodeSafetensors(tensors, { ...metadata, step: "4" }), /fails its checksum/); // metadata is covered
  await refused(encodeSafetensors(tensors, { ...metadata, version: "5" }), /has format version 5; this runtime reads versions 3 and 4/);
  await refused(encodeSafetensors(tensors, {}), /is not an edgetl checkpoint/);
  // an integer tensor under a correct checksum
  const ints = { ...tensors, b: { dtype: "I32", shape: [], data: Int32Array.of(1) } };
  const noSum = { ...metadata };
  delete noSum.sha256;
  const plain = encodeSafetensors(ints, noSum);
  const { entries, start } = readSafetensorsHeader(plain);
  const { checkpointDigest } = await import("../src/checkpoint.js");
  const withSum = encodeSafetensors(ints, { ...noSum, sha256: await checkpointDigest(noSum, entries, plain.subarray(start)) });
  await refused(withSum, /'b' is not a finite float array/);
});

test("safetensors bytes are the same format in Python and here", () => {
  const file = tmpFile("t.safetensors");
  fs.writeFileSync(file, encodeSafetensors({ a: { dtype: "F32", shape: [3], data: Float32Array.of(1, -2, 3.5) } }, { k: "v" }));
  const out = JSON.parse(python(["-c", `import json; from runtime.safetensors import decode, encode; import numpy as np
a, m = decode(open(${JSON.stringify(file)}, "rb").read())
open(${JSON.stringify(file)}, "wb").write(encode({"h": np.array([0.5, -1], np.float16), "d": np.array([[2.25]])}, {"k": "w"}))
print(json.dumps({"a": a["a"].tolist(), "m": m}))`]));
  assert.deepEqual(out, { a: [1, -2, 3.5], m: { k: "v" } });
  const bytes = new Uint8Array(fs.readFileSync(file));
  const { entries, metadata, start } = readSafetensorsHeader(bytes);
  assert.deepEqual(metadata, { k: "w" });
  assert.deepEqual(entries.map((e) => [e.name, e.dtype, e.shape]), [["h", "F16", [2]], ["d", "F64", [1, 1]]]);
  assert.deepEqual(Array.from(floatTensor(bytes, start, entries[0])), [0.5, -1]);
  assert.deepEqual(Array.from(floatTensor(bytes, start, entries[1])), [2.25]);
  const header = (obj, data = 0) => { const t = new TextEncoder().encode(JSON.stringify(obj)); const b = new Uint8Array(8 + t.length + data); new DataView(b.buffer).setBigUint64(0, BigInt(t.length), true); b.set(t, 8); return b; };
  for (const [bad, re] of [
    [header({ w: { dtype: "F32", shape: [4], data_offsets: [0, 12] } }, 12), /do not match its dtype and shape/],
    [header({ w: { dtype: "F32", shape: [1], data_offsets: [0, 4] } }, 8), /holds 4 bytes after its last tensor/],
    [header({ w: { dtype: "C64", shape: [1], data_offsets: [0, 8] } }, 8), /dtype "C64"/],
    [header({ __metadata__: { a: 1 } }), /does not map names to strings/],
  ]) assert.throws(() => readSafetensorsHeader(bad), (e) => e instanceof SafetensorsError && re.test(e.message));
});
