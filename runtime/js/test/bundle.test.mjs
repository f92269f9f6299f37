import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { BundleError } from "../src/errors.js";
import { loadBundleFromDir, loadTrainer } from "../src/node.js";
import { copyBundle, fixtures, python } from "./fixtures.mjs";

const fx = fixtures();

test("a bundle exported by the host loads and verifies", async () => {
  const b = await loadBundleFromDir(fx.bundle);
  assert.equal(b.target, "onnx");
  const state = await b.initialState();
  assert.deepEqual(Object.keys(state), [...b.trainable, ...b.stateNames]);
  assert.equal(state["head.weight"].length, 10 * 256);
});

test("a tampered program or state file is refused", async () => {
  for (const file of ["state.safetensors", "train_step.onnx"]) {
    const dir = copyBundle(fx.bundle);
    const p = path.join(dir, file);
    const bytes = fs.readFileSync(p);
    bytes[bytes.length - 10] ^= 1;
    fs.writeFileSync(p, bytes);
    await assert.rejects(loadTrainer(dir), (e) => e instanceof BundleError && e.message === `bundle file '${file}' fails its sha256 check (corrupt or altered)`);
  }
});

test("a manifest altered after export fails its own sha256", async () => {
  const dir = copyBundle(fx.bundle);
  const p = path.join(dir, "manifest.json");
  fs.writeFileSync(p, fs.readFileSync(p, "utf8").replace('"lr": 0.01', '"lr": 0.5'));
  await assert.rejects(loadBundleFromDir(dir), /manifest.json fails its sha256 check/);
});

test("a missing file and a path outside the bundle are refused", async () => {
  const dir = copyBundle(fx.bundle);
  fs.rmSync(path.join(dir, "eval.onnx"));
  await assert.rejects(loadBundleFromDir(dir), /bundle file 'eval.onnx' is missing/);
  await assert.rejects(loadBundleFromDir(path.join(dir, "nope")), /does not exist/);
  const outside = copyBundle(fx.bundle);
  fs.symlinkSync(path.join(outside, "eval.onnx"), path.join(dir, "eval.onnx"));
  await assert.rejects(loadBundleFromDir(dir), /bundle file 'eval.onnx' points outside the bundle directory/);
});

test("a signed bundle loads with its key and is refused with another key or once its manifest changes", async () => {
  const dir = copyBundle(fx.bundle);
  const keys = path.join(dir, "..", path.basename(dir) + "-keys");
  python(["-m", "edgetl", "keygen", "--out", keys, "--name", "a"]);
  python(["-m", "edgetl", "keygen", "--out", keys, "--name", "b"]);
  python(["-c", `from pathlib import Path; from edgetl.runtime import signing
d = Path(${JSON.stringify(dir)}); (d / "manifest.sig").write_bytes(signing.sign(signing.load_private_key(${JSON.stringify(path.join(keys, "a.key"))}), (d / "manifest.json").read_bytes()))`]);
  const b = await loadBundleFromDir(dir, { trustedKey: path.join(keys, "a.pub") });
  assert.equal(b.target, "onnx");
  await assert.rejects(loadBundleFromDir(dir, { trustedKey: path.join(keys, "b.pub") }), /the bundle is signed by another key/);
  const m = path.join(dir, "manifest.json");
  fs.writeFileSync(m, fs.readFileSync(m, "utf8") + " ");
  await assert.rejects(loadBundleFromDir(dir, { trustedKey: path.join(keys, "a.pub") }), /signature does not match its manifest.json/);
});

// bundles whose programs break a rule while every checksum is intact, made by the Python tests'
// helpers in one subprocess
const BAD = [["initializer", ""], ["attribute", ""], ["initializer", "external_data"], ["initializer", "data_location"], ["junk", ""]];
let badDirs;
function badBundles() {
  if (!badDirs) {
    badDirs = BAD.map(() => copyBundle(fx.bundle));
    python(["-c", `import json
from pathlib import Path
import onnx
from tests.test_bundle_programs import _externalize, _reseal
for d, (where, only) in zip(map(Path, json.loads(${JSON.stringify(JSON.stringify(badDirs))})), json.loads(${JSON.stringify(JSON.stringify(BAD))})):
    if where == "junk":
        (d / "eval.onnx").write_bytes(bytes([0x0a, 0xff, 0xff, 0xff, 0x0f, 1, 2]))
    else:
        _externalize(d / "eval.onnx", "weights.bin", where)
    if only:
        m = onnx.load(str(d / "eval.onnx"), load_external_data=False)
        t = next(t for t in m.graph.initializer if t.external_data)
        if only == "external_data":
            t.data_location = onnx.TensorProto.DEFAULT
        else:
            del t.external_data[:]
        (d / "eval.onnx").write_bytes(m.SerializeToString())
    _reseal(d)
`]);
  }
  return badDirs;
}

BAD.slice(0, 4).forEach(([where, only], i) => {
  test(`a program keeping a tensor (${where}${only ? ", marked by " + only + " alone" : ""}) in an external file is refused, with every checksum intact`, async () => {
    await assert.rejects(loadTrainer(badBundles()[i]), (e) => e instanceof BundleError &&
      /^the 'eval' program 'eval.onnx' keeps tensor '.+' in an external data file, which is refused/.test(e.message));
  });
});

test("a program that is not protobuf is refused", async () => {
  await assert.rejects(loadTrainer(badBundles()[4]), /cannot load the 'eval' program 'eval.onnx': it is not a valid ONNX model/);
});

test("an unsigned bundle is refused when a trusted key is given", async () => {
  const pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
  await assert.rejects(loadBundleFromDir(fx.bundle, { trustedKey: pem }), /the bundle is not signed/);
});

test("an npz state (bundles exported before safetensors) is read; a state unlike the manifest is refused as in Python", async () => {
  const want = await (await loadBundleFromDir(fx.bundle)).initialState();
  const old = copyBundle(fx.bundle), bad = copyBundle(fx.bundle), truncated = copyBundle(fx.bundle);
  const out = python(["-c", `import json, sys; sys.path.insert(0, "tests")
from pathlib import Path
import numpy as np
from state_files import as_npz_state
from edgetl.runtime import BundleError, load_bundle, safetensors
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest, sha256
as_npz_state(Path(${JSON.stringify(old)}))
def reseal(d, data):
    (d / "state.safetensors").write_bytes(data)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["state.safetensors"] = sha256(d / "state.safetensors")
    m[MANIFEST_DIGEST] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
bad, truncated = Path(${JSON.stringify(bad)}), Path(${JSON.stringify(truncated)})
a, meta = safetensors.decode((bad / "state.safetensors").read_bytes())
first = next(iter(a))
reseal(bad, safetensors.encode({**a, first: a[first].astype(np.int32)[..., :1]}, meta))
reseal(truncated, (truncated / "state.safetensors").read_bytes()[:-4])
msgs = []
for d in (bad, truncated):
    try:
        load_bundle(d).initial_state()
    except BundleError as e:
        msgs.append(str(e))
print(json.dumps(msgs))`]);
  const [badMsg, truncatedMsg] = JSON.parse(out);
  const got = await (await loadBundleFromDir(old)).initialState();
  assert.deepEqual(Object.keys(got), Object.keys(want));
  for (const k of Object.keys(want)) assert.deepEqual(got[k], want[k]);
  await assert.rejects((await loadBundleFromDir(bad)).initialState(), (e) => e instanceof BundleError && e.message === badMsg);
  await assert.rejects((await loadBundleFromDir(truncated)).initialState(), (e) => e instanceof BundleError && e.message === truncatedMsg);
  assert.match(badMsg, /^initial state '.*' is I32\[.*\], the manifest says float32\[/);
  assert.match(truncatedMsg, /^cannot read initial state 'state.safetensors': it declares \d+ bytes of tensor data but holds/);
});

test("a micro_batch that does not divide the batch is refused with the Python runtime's message", async () => {
  const dir = copyBundle(fx.bundle);
  const msg = python(["-c", `import json
from pathlib import Path
from edgetl.runtime import load_bundle
from edgetl.runtime.bundle import MANIFEST_DIGEST, manifest_digest
from edgetl.runtime.errors import BundleError
p = Path(${JSON.stringify(dir)}) / "manifest.json"
m = json.loads(p.read_text())
m["input"]["micro_batch"] = m["input"]["batch_size"] - 1
m[MANIFEST_DIGEST] = manifest_digest(m)
p.write_text(json.dumps(m))
try:
    load_bundle(p.parent)
except BundleError as e:
    print(e)`]).trim();
  assert.match(msg, /'input\.micro_batch' must be a positive integer dividing input\.batch_size, got 31/);
  await assert.rejects(loadBundleFromDir(dir), (e) => e instanceof BundleError && e.message === msg);
});
