// The session options the trainer gives onnxruntime-node take effect: `extra.session.disable_quant_qdq`
// folds the int8 depthwise kernels (DequantizeLinear of constants) to fp32 constants at load, as the
// Python runtime's session does (tests/test_onnx_passes.py); onnxruntime's fast depthwise Conv needs that.
import assert from "node:assert/strict";
import fs from "node:fs";
import { test } from "node:test";
import { fields } from "../src/onnx_proto.js";
import { loadTrainer } from "../src/node.js";
import { fixtures, tmpFile } from "./fixtures.mjs";

const fx = fixtures();
const text = (b) => new TextDecoder().decode(b);
const FLOAT = 1, INT8 = 3;

/** The element types of the kernels of an ONNX model's grouped convs: an initializer's, or, for a
 * DequantizeLinear of an initializer, that initializer's; -1 for a kernel computed otherwise. */
function groupedConvKernels(bytes) {
  const graph = [...fields(bytes)].find(([n]) => n === 7)[2];
  const types = new Map(), made = new Map(), convs = [];
  for (const [num, , value] of fields(graph)) {
    if (num === 5) { // initializer: name (8), data_type (2)
      const f = [...fields(value)];
      types.set(text(f.find(([n]) => n === 8)[2]), f.find(([n]) => n === 2)?.[2] ?? 0);
    } else if (num === 1) { // node: input (1), output (2), op_type (4), attribute (5: name 1, i 3)
      const f = [...fields(value)];
      const node = { inputs: f.filter(([n]) => n === 1).map(([, , v]) => text(v)), op: text(f.find(([n]) => n === 4)[2]) };
      for (const [, , o] of f.filter(([n]) => n === 2)) made.set(text(o), node);
      const group = f.filter(([n]) => n === 5).map(([, , a]) => [...fields(a)])
        .find((a) => text(a.find(([n]) => n === 1)[2]) === "group")?.find(([n]) => n === 3)?.[2] ?? 1;
      if (node.op === "Conv" && group > 1) convs.push(node);
    }
  }
  return new Set(convs.map(({ inputs: [, w] }) => types.has(w) ? types.get(w)
    : made.get(w)?.op === "DequantizeLinear" && types.has(made.get(w).inputs[0]) ? types.get(made.get(w).inputs[0]) : -1));
}

async function optimizedEval(sessionOptions) {
  // the trainer makes the train step's session, then the eval program's: the file is the eval program's
  const out = tmpFile("eval.opt.onnx");
  await loadTrainer(fx.depthwise, { sessionOptions: { ...sessionOptions, optimizedModelFilePath: out } });
  return groupedConvKernels(fs.readFileSync(out));
}

test("the depthwise kernels, int8 in the bundle, are fp32 constants in onnxruntime-node's session", async () => {
  assert.deepEqual(groupedConvKernels(fs.readFileSync(`${fx.depthwise}/eval.onnx`)), new Set([INT8]));
  assert.deepEqual(await optimizedEval({}), new Set([FLOAT]));
  // a caller's own `extra` keeps the fold; turning it off leaves the kernels int8
  assert.deepEqual(await optimizedEval({ extra: { session: { intra_op: { allow_spinning: "0" } } } }), new Set([FLOAT]));
  assert.deepEqual(await optimizedEval({ extra: { session: { disable_quant_qdq: "0" } } }), new Set([INT8]));
});
