#!/usr/bin/env node
// The browser demo's static server (no framework): the page, the runtime's core (src/), onnxruntime-web's
// files, one bundle and one data file.
//   node runtime/js/demo/serve.mjs BUNDLE --data FILE.npz [--port 8080] [--host 127.0.0.1]
// Prints "edgetl demo: URL" once listening (--port 0: any free port). Cross-origin isolated (COOP/COEP),
// so that onnxruntime-web may use SharedArrayBuffer and threads.
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PKG = path.resolve(HERE, "..");
const ORT_DIST = path.dirname(fileURLToPath(import.meta.resolve("onnxruntime-web")));
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".json": "application/json", ".wasm": "application/wasm", ".svg": "image/svg+xml" };

const fail = (msg) => { process.stderr.write(`node runtime/js/demo/serve.mjs: error: ${msg}\n`); process.exit(2); };

/** The file `rel` under `root`, or null when it does not exist or resolves outside `root`. */
function inside(root, rel) {
  const base = fs.realpathSync(root);
  const p = path.resolve(base, "." + path.posix.normalize("/" + rel));
  if (!fs.existsSync(p)) return null;
  const real = fs.realpathSync(p);
  if (!real.startsWith(base + path.sep) || !fs.statSync(real).isFile()) return null;
  return real;
}

/** A request handler for the demo: `/` the page, `/src/*` the core, `/ort/*` onnxruntime-web, `/bundle/*`, `/data.npz`. */
export function demoHandler({ bundle, data }) {
  const routes = [["/src/", path.join(PKG, "src")], ["/ort/", ORT_DIST], ["/bundle/", bundle], ["/", HERE]];
  return (req, res) => {
    let url;
    try { url = decodeURIComponent(new URL(req.url, "http://x").pathname); } catch { url = null; }
    let file = null;
    if (url === "/data.npz") file = data;
    else if (url !== null && req.method === "GET") {
      const [prefix, root] = routes.find(([p]) => url.startsWith(p));
      const rel = url === "/" ? "index.html" : url.slice(prefix.length);
      if (!(root === HERE && rel.endsWith(".mjs"))) file = inside(root, rel); // not the server itself
    }
    if (!file) { res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n"); return; }
    res.writeHead(200, {
      "Content-Type": TYPES[path.extname(file)] ?? "application/octet-stream",
      "Cache-Control": "no-store",
      "Cross-Origin-Opener-Policy": "same-origin",
      "Cross-Origin-Embedder-Policy": "require-corp",
    });
    fs.createReadStream(file).pipe(res);
  };
}

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  let a;
  try {
    a = parseArgs({ options: { data: { type: "string" }, port: { type: "string", default: "8080" }, host: { type: "string", default: "127.0.0.1" } },
      allowPositionals: true });
  } catch (e) { fail(e.message.split("\n")[0]); }
  const [bundle] = a.positionals;
  if (a.positionals.length !== 1) fail("give one bundle directory: serve.mjs BUNDLE --data FILE.npz");
  if (!fs.existsSync(path.join(bundle, "manifest.json"))) fail(`'${bundle}' is not a bundle directory (no manifest.json)`);
  if (!a.values.data || !fs.existsSync(a.values.data) || !fs.statSync(a.values.data).isFile()) fail(`data file '${a.values.data ?? ""}' does not exist (--data FILE.npz)`);
  if (!/^\d+$/.test(a.values.port)) fail(`--port must be a number, got '${a.values.port}'`);
  const server = http.createServer(demoHandler({ bundle: path.resolve(bundle), data: path.resolve(a.values.data) }));
  server.on("error", (e) => fail(`cannot serve on ${a.values.host}:${a.values.port}: ${e.code ?? e.message}`));
  server.listen(Number(a.values.port), a.values.host, () => {
    console.log(`edgetl demo: http://${a.values.host}:${server.address().port}/`);
  });
}
