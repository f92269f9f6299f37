// Test fixtures made by the host: an `onnx` bundle of mnist_cnn bias+mask and the digits data,
// exported once per checkout into a temp directory (EDGETL_JS_FIXTURES overrides it).
import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.EDGETL_PYTHON ?? path.join(ROOT, ".venv/bin/python");

export function python(args, opts = {}) {
  return execFileSync(PYTHON, args, { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], ...opts });
}

export function fixtures() {
  const key = crypto.createHash("sha256").update(ROOT).digest("hex").slice(0, 12);
  const dir = process.env.EDGETL_JS_FIXTURES ?? path.join(os.tmpdir(), `edgetl-js-fixtures-${key}`);
  const bundle = path.join(dir, "bundle"), data = path.join(dir, "digits.npz"), small = path.join(dir, "small.npz");
  if (!fs.existsSync(path.join(dir, "done"))) {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    python(["-m", "edgetl", "export", "mnist_cnn", "--recipe", "bias+mask", "--target", "onnx", "--num-classes", "10",
      "--batch-size", "32", "--out", bundle]);
    python(["-m", "edgetl", "data", "digits", "--bundle", bundle, "--out", data]);
    // 160 training samples: 5 steps an epoch, for parity runs of a few steps
    python(["-c", `import numpy as np; d = np.load(${JSON.stringify(data)}); np.savez(${JSON.stringify(small)}, x_train=d["x_train"][:160], y_train=d["y_train"][:160], x_test=d["x_test"][:64], y_test=d["y_test"][:64])`]);
    fs.writeFileSync(path.join(dir, "done"), "");
  }
  return { dir, bundle, data, small };
}

/** A copy of the bundle in a fresh temp directory, to tamper with. */
export function copyBundle(bundle) {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), "edgetl-js-bundle-"));
  fs.cpSync(bundle, out, { recursive: true });
  return out;
}

export const tmpFile = (name) => path.join(fs.mkdtempSync(path.join(os.tmpdir(), "edgetl-js-")), name);
