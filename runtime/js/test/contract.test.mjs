// The bundle contract has one source, runtime/contract.json (the Python runtime reads it):
// src/contract.js is generated from it, byte for byte, and what the JS runtime refuses or binds
// follows it.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { render, SOURCE, TARGET } from "../scripts/contract.mjs";
import { CONTRACT } from "../src/contract.js";
import { FORMAT, FORMAT_VERSION, MANIFEST, validateManifest } from "../src/bundle.js";
import { VERSION as CHECKPOINT_VERSION } from "../src/checkpoint.js";
import { BundleError } from "../src/errors.js";
import { expandNames, TARGET_NAMES } from "../src/targets.js";

const json = () => JSON.parse(fs.readFileSync(SOURCE, "utf8"));

test("src/contract.js is runtime/contract.json, as the generator writes it", () => {
  assert.equal(fs.readFileSync(TARGET, "utf8"), render(json()));
  assert.deepEqual(CONTRACT, json());
  execFileSync(process.execPath, [path.join(path.dirname(SOURCE), "js/scripts/contract.mjs"), "--check"]);
});

test("the runtime's formats, versions and targets are the contract's", () => {
  const c = json();
  assert.equal(FORMAT, c.bundle.format);
  assert.equal(FORMAT_VERSION, c.bundle.format_version);
  assert.equal(MANIFEST, c.bundle.manifest);
  assert.equal(CHECKPOINT_VERSION, c.checkpoint.version);
  assert.deepEqual(TARGET_NAMES, c.targets.map((t) => t.name));
  const onnx = c.targets.find((t) => t.name === "onnx").programs.find((p) => p.role === "train_step");
  assert.deepEqual(expandNames(onnx.outputs, ["param.0", "param.1"], ["state.0"]),
    ["loss", "logits", "new_param.0", "new_param.1", "new_state.0"]);
});

test("a target the contract does not know is unknown; one it knows but this runtime does not run is refused by name", () => {
  const m = { target: "tflite", input: {}, num_classes: 1, programs: {}, trainable: [], optimizer: {}, state_file: "", state_keys: {}, files: {} };
  assert.throws(() => validateManifest(m), (e) => e instanceof BundleError && /^unknown target 'tflite'/.test(e.message));
  for (const target of TARGET_NAMES.filter((t) => t !== "onnx")) {
    assert.throws(() => validateManifest({ ...m, target }), (e) => e instanceof BundleError && e.message.startsWith(`a ${target} bundle cannot run in the JavaScript runtime`));
  }
});
