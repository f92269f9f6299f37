// One bench row of the JavaScript runtime in headless Chromium (bench/js.py runs it): the demo
// page (runtime/js/demo) fits one epoch over DATA's x_train on onnxruntime-web's WASM, one thread.
//   node bench/js_browser.mjs BUNDLE DATA.npz
// Prints JSON: step times and the WASM heap onnxruntime-web grew to.
import { execFileSync, spawn } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const PKG = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../runtime/js");
const { chromium } = createRequire(path.join(PKG, "package.json"))("playwright-core");
const [bundle, data] = process.argv.slice(2);

const executablePath = execFileSync("sh", [path.join(PKG, "scripts/ensure-chromium.sh")], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] }).trim();
const server = spawn(process.execPath, [path.join(PKG, "demo/serve.mjs"), bundle, "--data", data, "--port", "0"], { stdio: ["ignore", "pipe", "inherit"] });
const url = await new Promise((resolve, reject) => {
  let out = "";
  server.stdout.on("data", (b) => { out += b; const m = out.match(/edgetl demo: (http:\S+)/); if (m) resolve(m[1]); });
  server.on("exit", (code) => reject(new Error(`the demo server exited (${code})`)));
});
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
try {
  const page = await browser.newPage();
  await page.goto(`${url}?autostart=1&epochs=1&seed=0&schedule=constant&threads=1`);
  await page.waitForFunction(() => window.edgetlResult !== undefined, null, { timeout: 1_800_000, polling: 500 });
  const r = await page.evaluate(() => { const { trainable, losses, ...rest } = window.edgetlResult; return rest; });
  if (r.error) throw new Error(r.error);
  console.log(JSON.stringify({ runtime: "js/onnxruntime-web (chromium)", steps: r.steps, step_ms_median: r.stepMsMedian,
    wasm_mb: r.peakWasmBytes / 2 ** 20 }));
} finally {
  await browser.close();
  server.kill();
}
