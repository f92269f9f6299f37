// The browser demo in a real headless Chromium (Debian's, via scripts/ensure-chromium.sh; driven by
// playwright-core, which downloads no browser): the page trains the digits bundle in the tab on
// onnxruntime-web's WASM and ends with the Python runtime's parameters and Node's accuracy.
import assert from "node:assert/strict";
import { execFile, execFileSync, spawn } from "node:child_process";
import path from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { chromium } from "playwright-core";
import { loadDataFile, loadTrainer } from "../src/node.js";
import { fixtures, maxDiff, PARITY_TOL, PYTHON, ROOT } from "./fixtures.mjs";

const fx = fixtures();
const FIT = { epochs: 2, schedule: "cosine", seed: 5, lr: 0.05 };
const PKG = path.join(ROOT, "runtime/js");

/** The Python runtime's trainable parameters and test accuracy after the same fit. */
async function pythonFit() {
  const { stdout } = await promisify(execFile)(PYTHON, ["-c", `import json
import numpy as np
from edgetl.runtime import Trainer
d = np.load(${JSON.stringify(fx.data)})
t = Trainer.load(${JSON.stringify(fx.bundle)})
t.fit(d["x_train"], d["y_train"], epochs=${FIT.epochs}, schedule="${FIT.schedule}", seed=${FIT.seed}, lr=${FIT.lr})
s = t.backend.get_state()
print(json.dumps({"trainable": {k: np.asarray(s[k]).ravel().tolist() for k in t.bundle.trainable}, "step": t.step,
  "accuracy": t.evaluate(d["x_test"], d["y_test"])["accuracy"]}))`], { cwd: ROOT, maxBuffer: 1 << 26 });
  return JSON.parse(stdout);
}

/** The demo server on a free port; resolves to [url, server process]. */
function serve() {
  const p = spawn(process.execPath, [path.join(PKG, "demo/serve.mjs"), fx.bundle, "--data", fx.data, "--port", "0"],
    { stdio: ["ignore", "pipe", "inherit"] });
  return new Promise((resolve, reject) => {
    let out = "";
    p.stdout.on("data", (b) => {
      out += b;
      const m = out.match(/edgetl demo: (http:\S+)/);
      if (m) resolve([m[1], p]);
    });
    p.on("exit", (code) => reject(new Error(`the demo server exited (${code}) before listening`)));
  });
}

test("the demo trains the digits bundle in headless Chromium to the Python runtime's parameters and Node's accuracy", { timeout: 600_000 }, async (t) => {
  const executablePath = execFileSync("sh", [path.join(PKG, "scripts/ensure-chromium.sh")], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] }).trim();
  const py = pythonFit();
  const [url, server] = await serve();
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
  try {
    const page = await browser.newPage();
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    const q = new URLSearchParams({ autostart: "1", threads: "1", ...Object.fromEntries(Object.entries(FIT).map(([k, v]) => [k, String(v)])) });
    await page.goto(`${url}?${q}`);
    await page.waitForFunction(() => window.edgetlResult !== undefined, null, { timeout: 300_000, polling: 250 });
    const r = await page.evaluate(() => window.edgetlResult);
    assert.equal(r.error, undefined, r.error);
    assert.deepEqual(pageErrors, []);
    // what the page shows: a full progress bar, the accuracy and the WASM memory in use
    assert.equal(await page.$eval("#progress", (e) => e.value), 1);
    assert.match(await page.textContent("#accuracy"), /^\d+\.\d\d %/);
    assert.match(await page.textContent("#wasm"), /^\d+\.\d MB$/);
    assert.ok(r.peakWasmBytes >= 16 << 20, `WASM memory ${r.peakWasmBytes} bytes`);
    assert.equal(r.losses.length, r.steps);

    const ref = await py;
    assert.equal(r.steps, ref.step);
    assert.ok(r.steps >= 60, `only ${r.steps} steps`);
    const d = await loadDataFile(fx.data);
    const node = await loadTrainer(fx.bundle, { backend: "node" });
    const trainable = (tr) => Object.fromEntries(tr.bundle.trainable.map((k) => [k, tr.state[k]]));
    const moved = maxDiff(trainable(node), ref.trainable);
    assert.ok(moved > 1e-3, "training changed nothing: the comparison would be empty");
    const diff = maxDiff(r.trainable, ref.trainable);
    t.diagnostic(`${r.steps} steps in ${(r.totalMs / 1000).toFixed(1)} s in the tab (step median ${r.stepMsMedian.toFixed(1)} ms), ` +
      `WASM memory ${(r.peakWasmBytes / 2 ** 20).toFixed(1)} MB, max |browser - python| = ${diff.toExponential(2)}`);
    assert.ok(diff <= PARITY_TOL, `max |browser - python| = ${diff}`);
    await node.fit(d.x_train, d.y_train, FIT);
    const acc = (await node.evaluate(d.x_test, d.y_test)).accuracy;
    assert.equal(r.testAccuracy, acc);
    assert.equal(ref.accuracy, acc);
    assert.ok(acc >= 0.9, `test accuracy ${acc}`);
  } finally {
    await browser.close();
    server.kill();
  }
});
