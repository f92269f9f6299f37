// One bench row of the JavaScript runtime in Node (bench/js.py runs it in a fresh process):
//   node bench/js_node.mjs BUNDLE DATA.npz node|web
// Fits one epoch over DATA's x_train and prints JSON: step times, the resident memory after loading
// (bundle, sessions and data) and its peak during the fit (VmHWM, reset before the fit), and for
// "web" the WASM heap onnxruntime-web grew to.
import fs from "node:fs";
import { loadDataFile, loadTrainer } from "../runtime/js/src/node.js";

const [bundle, data, backend] = process.argv.slice(2);
const memories = new Set();
const NativeMemory = WebAssembly.Memory;
WebAssembly.Memory = new Proxy(NativeMemory, { construct(t, a) { const m = Reflect.construct(t, a); memories.add(m); return m; } });
for (const name of ["instantiate", "instantiateStreaming"]) {
  const native = WebAssembly[name];
  WebAssembly[name] = async (...args) => {
    const r = await native.apply(WebAssembly, args);
    for (const v of Object.values((r.instance ?? r).exports ?? {})) if (v instanceof NativeMemory) memories.add(v);
    return r;
  };
}
const status = (key) => Number(fs.readFileSync("/proc/self/status", "utf8").match(new RegExp(`^${key}:\\s+(\\d+) kB`, "m"))[1]) / 1024;

const d = await loadDataFile(data);
const t = await loadTrainer(bundle, { backend });
const loadMb = status("VmRSS");
fs.writeFileSync("/proc/self/clear_refs", "5"); // VmHWM := VmRSS
const r = await t.fit(d.x_train, d.y_train, { epochs: 1, seed: 0 });
const out = { runtime: `js/onnxruntime-${backend}`, steps: r.steps, step_ms: r.stepMs, step_ms_median: r.stepMsMedian,
  load_mb: loadMb, peak_mb: status("VmHWM") };
if (backend === "web") out.wasm_mb = [...memories].reduce((s, m) => s + m.buffer.byteLength, 0) / 2 ** 20;
console.log(JSON.stringify(out));
