// The core must run where there is no Node (browsers, React Native): only node.js may use Node APIs.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const SRC = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../src");

test("the core modules import no Node module and use no Node-only global", () => {
  const core = fs.readdirSync(SRC).filter((f) => f.endsWith(".js") && f !== "node.js");
  assert.ok(core.includes("trainer.js") && core.includes("bundle.js"));
  for (const f of core) {
    const code = fs.readFileSync(path.join(SRC, f), "utf8").replace(/\/\/.*$/gm, "");
    for (const m of code.matchAll(/\bfrom\s+"([^"]+)"|import\(\s*"([^"]+)"\s*\)/g)) {
      const spec = m[1] ?? m[2];
      assert.ok(spec.startsWith("./") && spec !== "./node.js", `${f} imports ${spec}`);
    }
    for (const g of [/(?<![\w.])process\./, /(?<![\w.])Buffer\b/, /(?<![\w.])require\(/, /\b__dirname\b/, /\bsetImmediate\b/]) {
      assert.ok(!g.test(code), `${f} uses ${g}`);
    }
  }
});
