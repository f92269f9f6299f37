// Writes src/contract.js from the bundle contract's one source, runtime/contract.json (which the
// Python runtime reads): `node scripts/contract.mjs` after changing the JSON; `--check` exits 1
// when src/contract.js is stale (test/contract.test.mjs runs it; so does tests/test_targets.py).
// A generated JS module rather than a JSON import: Node, browsers and React Native bundlers
// (Metro) all load a plain ES module, with no import attributes or JSON loader needed.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const SOURCE = path.resolve(HERE, "../../contract.json");
export const TARGET = path.resolve(HERE, "../src/contract.js");

export function render(contract) {
  return "// Generated from runtime/contract.json by `node scripts/contract.mjs` (in runtime/js): do not edit.\n" +
    "// The bundle contract's facts (formats, versions, file and tensor names, targets), shared with\n" +
    "// the Python runtime, which reads the JSON; BUNDLE.md describes them.\n" +
    `export const CONTRACT = ${JSON.stringify(contract, null, 2)};\n`;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const text = render(JSON.parse(fs.readFileSync(SOURCE, "utf8")));
  if (process.argv.includes("--check")) {
    const now = fs.existsSync(TARGET) ? fs.readFileSync(TARGET, "utf8") : null;
    if (now !== text) {
      console.error(`${path.relative(process.cwd(), TARGET)} differs from runtime/contract.json; run node runtime/js/scripts/contract.mjs`);
      process.exit(1);
    }
  } else {
    fs.writeFileSync(TARGET, text);
  }
}
