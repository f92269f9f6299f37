// Test fixtures made by the host: `onnx` bundles of mnist_cnn (bias+mask, whole batches and
// micro-batches; head with AdamW), a depthwise toy and the digits data,
// exported once per checkout into node_modules/.cache (EDGETL_JS_FIXTURES overrides it); the scratch
// files a test makes lie in one temp directory per test process, removed when the process exits.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

// onnxruntime-node 1.30's telemetry leaves an empty /tmp/mat-debug-<pid>.log behind every process that
// makes a session (read when the first session is made; child processes inherit it)
process.env.ORT_DISABLE_TELEMETRY ??= "1";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.EDGETL_PYTHON ?? path.join(ROOT, ".venv/bin/python");

export function python(args, opts = {}) {
  return execFileSync(PYTHON, args, { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], ...opts });
}

const DEPTHWISE_EXPORT = `import sys, torch.nn as nn, edgetl
from edgetl.exporters import export
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
pm = edgetl.prepare(net, "bias+mask", num_classes=4, input_shape=(3, 8, 8))
export(pm, "onnx", sys.argv[1], edgetl.OptimizerConfig.make("sgd", lr=0.05), batch_size=2)`;

export function fixtures() {
  // a cache per checkout, per version of this file and of the exporters that make the fixtures
  const h = crypto.createHash("sha256").update(ROOT).update(fs.readFileSync(fileURLToPath(import.meta.url)));
  for (const dir of ["exporters", "runtime"]) {
    for (const f of fs.readdirSync(path.join(ROOT, dir)).filter((f) => f.endsWith(".py")).sort()) h.update(fs.readFileSync(path.join(ROOT, dir, f)));
  }
  const key = h.digest("hex").slice(0, 12);
  let dir = process.env.EDGETL_JS_FIXTURES;
  if (!dir) {
    // inside the checkout, not the shared temp directory: a new version of the exporters replaces the
    // fixtures of older ones (and the leftovers of an interrupted export) instead of adding a directory
    const cache = path.join(ROOT, "runtime/js/node_modules/.cache/edgetl-test-fixtures");
    dir = path.join(cache, key);
    if (fs.existsSync(cache)) {
      for (const old of fs.readdirSync(cache).filter((f) => f !== key && !f.startsWith(`${key}.tmp-`))) {
        fs.rmSync(path.join(cache, old), { recursive: true, force: true });
      }
    }
  }
  const bundle = path.join(dir, "bundle"), data = path.join(dir, "digits.npz"), small = path.join(dir, "small.npz");
  const adamw = path.join(dir, "adamw");
  if (!fs.existsSync(path.join(dir, "done"))) {
    // made in a private directory and renamed into place: test files run in parallel processes
    const tmp = `${dir}.tmp-${process.pid}`;
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp, { recursive: true });
    const [b, dt, sm] = ["bundle", "digits.npz", "small.npz"].map((f) => path.join(tmp, f));
    python(["-m", "edgetl", "export", "mnist_cnn", "--recipe", "bias+mask", "--target", "onnx", "--num-classes", "10",
      "--batch-size", "32", "--out", b]);
    python(["-m", "edgetl", "data", "digits", "--bundle", b, "--out", dt]);
    // AdamW keeps a 0-d step counter: a shape of [] through state, sessions and checkpoints
    python(["-m", "edgetl", "export", "mnist_cnn", "--recipe", "head", "--target", "onnx", "--num-classes", "10",
      "--batch-size", "32", "--optimizer", "adamw", "--lr", "0.01", "--out", path.join(tmp, "adamw")]);
    // the bundle's step in micro-batches of 8: 4 calls a batch, one optimizer update (accum:* and micro_step state)
    python(["-m", "edgetl", "export", "mnist_cnn", "--recipe", "bias+mask", "--target", "onnx", "--num-classes", "10",
      "--batch-size", "32", "--micro-batch", "8", "--out", path.join(tmp, "micro")]);
    // a depthwise conv (int8 kernel, dequantized from constants only): the session options' fold
    python(["-c", DEPTHWISE_EXPORT, path.join(tmp, "depthwise")]);
    // 160 training samples: 5 steps an epoch, for parity runs of a few steps
    python(["-c", `import numpy as np; d = np.load(${JSON.stringify(dt)}); np.savez(${JSON.stringify(sm)}, x_train=d["x_train"][:160], y_train=d["y_train"][:160], x_test=d["x_test"][:64], y_test=d["y_test"][:64])`]);
    fs.writeFileSync(path.join(tmp, "done"), "");
    try {
      fs.renameSync(tmp, dir);
    } catch {
      fs.rmSync(tmp, { recursive: true, force: true }); // another process was first
    }
  }
  return { dir, bundle, data, small, adamw, depthwise: path.join(dir, "depthwise"), micro: path.join(dir, "micro") };
}

let scratch = null;

/** This process's temp directory (made on first use, removed with everything in it at exit). */
function scratchDir() {
  if (scratch === null) {
    scratch = fs.mkdtempSync(path.join(os.tmpdir(), "edgetl-js-"));
    process.on("exit", () => fs.rmSync(scratch, { recursive: true, force: true }));
  }
  return scratch;
}

/** A copy of the bundle in a fresh temp directory, to tamper with. */
export function copyBundle(bundle) {
  const out = fs.mkdtempSync(path.join(scratchDir(), "bundle-"));
  fs.cpSync(bundle, out, { recursive: true });
  return out;
}

/** A path `name` in a fresh, empty temp directory. */
export const tmpFile = (name) => path.join(fs.mkdtempSync(path.join(scratchDir(), "f-")), name);

// How far a JS run's parameters may be from the Python runtime's (`maxDiff`). Measured: onnxruntime-node
// and the Python runtime agree bit for bit; onnxruntime-web's WASM kernels differ by up to 3e-7 (10 steps).
export const PARITY_TOL = 1e-6;

// The largest absolute difference between two {name: number[]} maps with the same names and lengths.
export function maxDiff(a, b) {
  let m = 0;
  assert.deepEqual(Object.keys(a).sort(), Object.keys(b).sort());
  for (const k of Object.keys(b)) {
    assert.equal(a[k].length, b[k].length, k);
    for (let i = 0; i < a[k].length; i++) m = Math.max(m, Math.abs(a[k][i] - b[k][i]));
  }
  return m;
}

/** JS loads `bundle`, resumes Python's one-epoch checkpoint bytes `pyOne` and finishes `fit` on `data`: the
 * remaining 5 steps only, to the reference state `ref` (the Python run's). */
export async function assertJsResumesPython(bundle, pyOne, data, fit, ref) {
  const { fileCheckpointStore, loadTrainer } = await import("../src/node.js"); // after the telemetry setting above
  const pyCkpt = tmpFile("py1.ckpt");
  fs.writeFileSync(pyCkpt, pyOne);
  const t = await loadTrainer(bundle);
  t.notice = () => {};
  const r = await t.fit(data.x_train, data.y_train, { ...fit, checkpoint: fileCheckpointStore(pyCkpt) });
  assert.equal(r.losses.length, 5, "the resumed run takes the remaining 5 steps only");
  assert.ok(maxDiff(t.getState(), ref) <= PARITY_TOL);
}
