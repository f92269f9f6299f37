#!/usr/bin/env node
// The device command line in JavaScript, with the Python CLI's JSON fields:
//   node runtime/js/cli.mjs fit BUNDLE --data FILE.npz --epochs N [--lr LR] [--schedule cosine] [--seed S]
//        [--checkpoint CKPT] [--checkpoint-every K] [--backend node|web] [--trusted-key KEY.pub] --json
//   node runtime/js/cli.mjs evaluate BUNDLE --data FILE.npz [--checkpoint CKPT] [--split test|train] --json
// Errors: one line on stderr, exit code 2.
import { parseArgs } from "node:util";
import { EdgeRuntimeError } from "./src/errors.js";
import { checkImages, checkLabels } from "./src/data.js";
import { fileCheckpointStore, loadDataFile, loadTrainer } from "./src/node.js";

const PROG = "node runtime/js/cli.mjs";
const usage = (msg) => { process.stderr.write(`${PROG}: error: ${msg} (see --help)\n`); process.exit(2); };
const HELP = `usage: ${PROG} {fit,evaluate} BUNDLE --data FILE.npz [options] [--json]`;

const peakRssMb = () => process.resourceUsage().maxRSS / 1024;

function intArg(v, name) {
  if (!/^-?\d+$/.test(v)) usage(`argument --${name}: invalid int value: '${v}'`);
  return Number(v);
}

async function main(argv) {
  const [command, ...rest] = argv;
  if (!command || command === "--help" || command === "-h") { console.log(HELP); return 0; }
  if (!["fit", "evaluate"].includes(command)) usage(`argument command: invalid choice: '${command}' (choose from 'fit', 'evaluate')`);
  const options = {
    data: { type: "string" }, checkpoint: { type: "string" }, json: { type: "boolean" },
    "trusted-key": { type: "string" }, backend: { type: "string", default: "node" }, "no-progress": { type: "boolean" },
    ...(command === "fit"
      ? { epochs: { type: "string", default: "1" }, lr: { type: "string" }, schedule: { type: "string", default: "constant" },
          seed: { type: "string", default: "0" }, "checkpoint-every": { type: "string", default: "0" } }
      : { split: { type: "string", default: "test" } }),
  };
  let parsed;
  try { parsed = parseArgs({ args: rest, options, allowPositionals: true }); } catch (e) { usage(e.message.split("\n")[0]); }
  const { values: a, positionals } = parsed;
  if (positionals.length !== 1) usage(positionals.length ? `unrecognized arguments: ${positionals.slice(1).join(" ")}` : "the following arguments are required: bundle");
  if (!a.data) usage("the following arguments are required: --data");
  const bundleDir = positionals[0];
  let out;
  if (command === "fit") {
    const epochs = intArg(a.epochs, "epochs"), seed = intArg(a.seed, "seed"), every = intArg(a["checkpoint-every"], "checkpoint-every");
    if (!["constant", "cosine"].includes(a.schedule)) usage(`argument --schedule: invalid choice: '${a.schedule}' (choose from 'constant', 'cosine')`);
    const lr = a.lr === undefined ? null : Number(a.lr);
    if (a.lr !== undefined && Number.isNaN(lr)) usage(`argument --lr: invalid float value: '${a.lr}'`);
    if (every > 0 && !a.checkpoint) throw new EdgeRuntimeError("--checkpoint-every needs --checkpoint (the file to save to)");
    const data = await loadDataFile(a.data);
    const t = await loadTrainer(bundleDir, { backend: a.backend, trustedKey: a["trusted-key"] ?? process.env.EDGETL_TRUSTED_KEY ?? null });
    checkLabels(data.y_test, checkImages(data.x_test, t.bundle.inputShape, "x_test").shape[0], t.bundle.numClasses, "y_test");
    const progress = a["no-progress"] || !process.stderr.isTTY ? null
      : ({ done, total, loss }) => process.stderr.write(`\rfit ${done}/${total} loss ${loss.toFixed(4)}${done === total ? "\n" : ""}`);
    const r = await t.fit(data.x_train, data.y_train, { epochs, lr, schedule: a.schedule, seed,
      checkpoint: a.checkpoint ? fileCheckpointStore(a.checkpoint) : null, checkpointEvery: every, onProgress: progress });
    const train = await t.evaluate(data.x_train, data.y_train);
    const test = await t.evaluate(data.x_test, data.y_test);
    out = { target: t.bundle.target, model: t.bundle.manifest.model, recipe: t.bundle.manifest.recipe, steps: r.steps,
      final_loss: r.finalLoss, train_accuracy: train.accuracy, test_accuracy: test.accuracy, test_loss: test.loss,
      step_ms_median: r.stepMsMedian, step_ms_min: r.stepMs.length ? Math.min(...r.stepMs) : null, peak_rss_mb: peakRssMb(),
      runtime: `js/onnxruntime-${a.backend}` };
  } else {
    if (!["test", "train"].includes(a.split)) usage(`argument --split: invalid choice: '${a.split}' (choose from 'test', 'train')`);
    const data = await loadDataFile(a.data);
    const t = await loadTrainer(bundleDir, { backend: a.backend, trustedKey: a["trusted-key"] ?? process.env.EDGETL_TRUSTED_KEY ?? null });
    if (a.checkpoint) await t.loadCheckpoint(fileCheckpointStore(a.checkpoint));
    out = { split: a.split, ...(await t.evaluate(data[`x_${a.split}`], data[`y_${a.split}`])), peak_rss_mb: peakRssMb() };
  }
  const finite = (v) => (typeof v === "number" && !Number.isFinite(v) ? null : v);
  out = Object.fromEntries(Object.entries(out).map(([k, v]) => [k, finite(v)]));
  if (a.json) console.log(JSON.stringify(out));
  else for (const [k, v] of Object.entries(out)) console.log(`${k}: ${v}`);
  return 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  if (err instanceof EdgeRuntimeError) {
    process.stderr.write(`edgetl.runtime: error: ${String(err.message).split(/\s+/).join(" ")}\n`);
    process.exitCode = 2;
  } else throw err;
}
