// The page: options in, a worker (worker.js) trains, progress, loss curve, accuracy and memory out.
// `?autostart=1&epochs=2&seed=0&lr=0.05&schedule=cosine&threads=1` starts at once (the browser test
// does); the outcome is left in `window.edgetlResult` ({error} when training failed).
const $ = (id) => document.getElementById(id);
const MB = (b) => `${(b / 2 ** 20).toFixed(1)} MB`;
const params = new URLSearchParams(location.search);
for (const k of ["epochs", "seed", "lr", "schedule", "threads"]) if (params.has(k)) $(k).value = params.get(k);

function drawCurve(losses, total) {
  const c = $("curve"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (!losses.length) return;
  const pad = 50, w = c.width - 2 * pad, h = c.height - 2 * pad;
  const top = Math.max(...losses.filter(Number.isFinite), 1e-6);
  g.strokeStyle = "#999"; g.lineWidth = 2; g.font = "24px system-ui"; g.fillStyle = "#666";
  g.strokeRect(pad, pad, w, h);
  g.fillText(top.toFixed(2), 4, pad + 8); g.fillText("0", 20, pad + h);
  g.fillText(`step ${total}`, pad + w - 110, pad + h + 34);
  g.strokeStyle = "#1565c0"; g.lineWidth = 3; g.beginPath();
  losses.forEach((l, i) => {
    const x = pad + (w * (i + 1)) / Math.max(total, 1), y = pad + h - (h * Math.min(l, top)) / top;
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}

function showJsHeap() {
  // performance.memory: Chromium only (non-standard); the worker's WASM heap is shown separately
  if (performance.memory) $("jsheap").textContent = MB(performance.memory.usedJSHeapSize);
  else $("jsheap").textContent = "not reported by this browser";
}

function start() {
  $("start").disabled = true;
  $("error").textContent = "";
  window.edgetlResult = undefined;
  const lr = $("lr").value.trim();
  const opts = { epochs: Number($("epochs").value), seed: Number($("seed").value), schedule: $("schedule").value,
    lr: lr ? Number(lr) : null, threads: Number($("threads").value) };
  const losses = [];
  let peakWasm = 0, total = 0;
  const worker = new Worker(new URL("worker.js", import.meta.url), { type: "module" });
  $("status").textContent = "Loading the bundle and data…";
  worker.onmessage = ({ data: m }) => {
    if (m.wasmBytes !== undefined) { peakWasm = Math.max(peakWasm, m.wasmBytes); $("wasm").textContent = MB(m.wasmBytes); }
    if (m.type === "loaded") {
      $("bundle").textContent = `${m.model} ${m.recipe}, batch ${m.batch}; ${m.train} train / ${m.test} test samples`;
      $("status").textContent = `Loaded in ${(m.loadMs / 1000).toFixed(1)} s; training…`;
    } else if (m.type === "progress") {
      losses.push(m.loss);
      total = m.total;
      $("progress").value = m.done / m.total;
      $("steps").textContent = `${m.done} / ${m.total} (epoch ${m.epoch + 1})`;
      $("loss").textContent = m.loss.toFixed(4);
      if (m.done === m.total || m.done % 5 === 0) { drawCurve(losses, total); showJsHeap(); }
    } else if (m.type === "done") {
      drawCurve(losses, total);
      showJsHeap();
      $("stepms").textContent = `${m.stepMsMedian.toFixed(1)} ms`;
      $("accuracy").textContent = `${(100 * m.testAccuracy).toFixed(2)} % (test loss ${m.testLoss.toFixed(4)})`;
      $("status").textContent = `Done: ${m.steps} steps in ${(m.totalMs / 1000).toFixed(1)} s.`;
      window.edgetlResult = { ...m, peakWasmBytes: peakWasm, jsHeapBytes: performance.memory?.usedJSHeapSize ?? null };
    } else if (m.type === "error") {
      $("error").textContent = `${m.name}: ${m.message}`;
      $("status").textContent = "Failed.";
      window.edgetlResult = { error: `${m.name}: ${m.message}` };
    }
    if (m.type === "done" || m.type === "error") { worker.terminate(); $("start").disabled = false; }
  };
  worker.onerror = (e) => {
    $("error").textContent = `the worker failed: ${e.message}`;
    window.edgetlResult = { error: `the worker failed: ${e.message}` };
    $("start").disabled = false;
  };
  worker.postMessage(opts);
}

$("start").addEventListener("click", start);
if (params.get("autostart") === "1") start();
