// The demo's static server: the page, the core, onnxruntime-web and the one bundle and data file it
// was given, nothing else; bad command lines are one line on stderr and exit code 2.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { test } from "node:test";
import { demoHandler } from "../demo/serve.mjs";
import { fixtures, ROOT, tmpFile } from "./fixtures.mjs";

const fx = fixtures();
const SERVE = path.join(ROOT, "runtime/js/demo/serve.mjs");

async function withServer(fn) {
  const server = http.createServer(demoHandler({ bundle: fx.bundle, data: fx.data }));
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  try {
    await fn(`http://127.0.0.1:${server.address().port}`);
  } finally {
    server.close();
  }
}

test("the server gives the page, the core, onnxruntime-web, the bundle and the data, cross-origin isolated", async () => {
  await withServer(async (base) => {
    const cases = [["/", "text/html"], ["/worker.js", "text/javascript"], ["/src/trainer.js", "text/javascript"],
      ["/ort/ort.wasm.bundle.min.mjs", "text/javascript"], ["/ort/ort-wasm-simd-threaded.wasm", "application/wasm"],
      ["/bundle/manifest.json", "application/json"], ["/data.npz", "application/octet-stream"]];
    for (const [url, type] of cases) {
      const r = await fetch(base + url);
      assert.equal(r.status, 200, url);
      assert.ok(r.headers.get("content-type").startsWith(type), `${url}: ${r.headers.get("content-type")}`);
      assert.equal(r.headers.get("cross-origin-embedder-policy"), "require-corp");
      assert.equal(r.headers.get("cross-origin-opener-policy"), "same-origin");
      await r.arrayBuffer();
    }
    const manifest = await (await fetch(base + "/bundle/manifest.json")).text();
    assert.equal(manifest, fs.readFileSync(path.join(fx.bundle, "manifest.json"), "utf8"));
  });
});

test("the server gives nothing outside its roots: no parent directories, not itself", async () => {
  await withServer(async (base) => {
    for (const url of ["/bundle/../../../etc/passwd", "/bundle/%2e%2e/%2e%2e/etc/passwd", "/src/..%2fpackage.json",
      "/serve.mjs", "/bundle/nothing.onnx", "/%E0%A4%A"]) {
      // the path as sent, not normalized by a URL parser
      const status = await new Promise((resolve, reject) => {
        http.get(base + "/", { path: url }, (r) => { r.resume(); resolve(r.statusCode); }).on("error", reject);
      });
      assert.equal(status, 404, url);
    }
  });
});

test("a bad command line is one line on stderr and exit code 2", () => {
  const empty = path.dirname(tmpFile("x"));
  for (const [args, msg] of [[[empty, "--data", fx.data], /is not a bundle directory/], [[fx.bundle], /data file '' does not exist/],
    [[fx.bundle, "--data", fx.data, "--port", "x"], /--port must be a number/]]) {
    const r = spawnSync(process.execPath, [SERVE, ...args], { encoding: "utf8", timeout: 30_000 });
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, msg);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  }
});
