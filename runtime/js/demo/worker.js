// Trains in a module worker, so that the page stays responsive: the runtime's core (/src) on
// onnxruntime-web's WASM backend, with the bundle and data the demo server serves. Messages out:
// {type: "loaded" | "progress" | "done" | "error", ...}; in: {epochs, lr, schedule, seed, threads}.
import { datasetFromNpz, fetchSource, readNpz, Trainer } from "/src/index.js";

// The WASM memory in use: every WebAssembly.Memory onnxruntime-web makes (created in JS, or exported
// by its module), read as the size of its buffer (a WASM heap only grows).
const memories = new Set();
const NativeMemory = WebAssembly.Memory;
WebAssembly.Memory = new Proxy(NativeMemory, {
  construct(target, args) { const m = Reflect.construct(target, args); memories.add(m); return m; },
});
for (const name of ["instantiate", "instantiateStreaming"]) {
  const native = WebAssembly[name];
  WebAssembly[name] = async (...args) => {
    const r = await native.apply(WebAssembly, args);
    const exports = (r.instance ?? r).exports ?? {};
    for (const v of Object.values(exports)) if (v instanceof NativeMemory) memories.add(v);
    return r;
  };
}
const wasmBytes = () => [...memories].reduce((s, m) => s + m.buffer.byteLength, 0);

self.onmessage = async ({ data: opts }) => {
  try {
    const t0 = performance.now();
    const ort = await import("/ort/ort.wasm.bundle.min.mjs");
    ort.env.wasm.wasmPaths = new URL("/ort/", self.location.origin).href;
    ort.env.wasm.numThreads = opts.threads ?? 1;
    const [trainer, d] = await Promise.all([
      Trainer.load(fetchSource(new URL("/bundle/", self.location.origin).href), { ort }),
      fetch("/data.npz").then(async (r) => {
        if (!r.ok) throw new Error(`cannot fetch the data file: HTTP ${r.status}`);
        return datasetFromNpz(await readNpz(new Uint8Array(await r.arrayBuffer())), "the data file");
      }),
    ]);
    const m = trainer.bundle.manifest;
    postMessage({ type: "loaded", model: m.model, recipe: m.recipe, train: d.x_train.shape[0], test: d.x_test.shape[0],
      batch: trainer.bundle.batchSize, loadMs: performance.now() - t0, wasmBytes: wasmBytes() });
    const r = await trainer.fit(d.x_train, d.y_train, {
      epochs: opts.epochs, lr: opts.lr ?? null, schedule: opts.schedule, seed: opts.seed,
      onProgress: ({ done, total, epoch, loss, lr, ms }) => postMessage({ type: "progress", done, total, epoch, loss, lr, ms, wasmBytes: wasmBytes() }),
    });
    const test = await trainer.evaluate(d.x_test, d.y_test);
    const trainable = Object.fromEntries(trainer.bundle.trainable.map((k) => [k, Array.from(trainer.state[k])]));
    postMessage({ type: "done", steps: r.steps, finalLoss: r.finalLoss, stepMsMedian: r.stepMsMedian, losses: r.losses,
      testAccuracy: test.accuracy, testLoss: test.loss, trainable, wasmBytes: wasmBytes(), totalMs: performance.now() - t0 });
  } catch (e) {
    postMessage({ type: "error", name: e?.name ?? "Error", message: String(e?.message ?? e) });
  }
};
