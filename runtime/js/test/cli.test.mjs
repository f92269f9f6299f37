import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { fixtures, python } from "./fixtures.mjs";

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../cli.mjs");
const fx = fixtures();
const node = (args) => spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8" });

test("fit --json prints the Python CLI's fields", () => {
  const r = node(["fit", fx.bundle, "--data", fx.small, "--epochs", "1", "--json"]);
  assert.equal(r.status, 0, r.stderr);
  const js = JSON.parse(r.stdout);
  const py = JSON.parse(python(["-m", "edgetl.runtime", "fit", fx.bundle, "--data", fx.small, "--epochs", "1", "--json", "--no-progress"]));
  for (const k of Object.keys(py)) assert.ok(k in js, `missing '${k}'`);
  assert.equal(js.steps, 5);
  assert.ok(Math.abs(js.final_loss - py.final_loss) < 1e-4, `${js.final_loss} vs ${py.final_loss}`);
  assert.ok(Math.abs(js.test_accuracy - py.test_accuracy) < 1e-9);
});

test("errors are one line on stderr and exit code 2", () => {
  let r = node(["fit", "/nonexistent-bundle", "--data", fx.small]);
  assert.equal(r.status, 2);
  assert.equal(r.stderr, "edgetl.runtime: error: bundle directory '/nonexistent-bundle' does not exist\n");
  r = node(["evaluate", fx.bundle, "--data", "/nonexistent.npz"]);
  assert.equal(r.status, 2);
  assert.match(r.stderr, /^edgetl.runtime: error: data file '\/nonexistent.npz' does not exist\n$/);
  r = node(["fit", fx.bundle]);
  assert.equal(r.status, 2);
  assert.match(r.stderr, /required: --data/);
});
