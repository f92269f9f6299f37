"""The JavaScript runtime beside the Python one: step time and memory of the same `onnx` bundle
trained by the Python runtime (onnxruntime, native), by runtime/js in Node on onnxruntime-node
(native) and on onnxruntime-web (WASM), and in headless Chromium (the demo page, WASM). Every row is
a fresh process fitting one epoch of synthetic data; memory is measured in one run with
MALLOC_MMAP_THRESHOLD_=65536 (as bench/run.py), step time in another without it.

    python bench/js.py                   # mnist_cnn and efficientnet_lite0 (224, batch 8), bias+mask
    python bench/js.py --models mnist_cnn --write    # and replace BENCHMARKS.md's JS section

Needs the host extra (to export), runtime/js's node_modules and Chromium
(runtime/js/scripts/ensure-chromium.sh installs Debian's where it may).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"mnist_cnn": {"size": 28, "batch": 32, "steps": 20}, "efficientnet_lite0": {"size": 224, "batch": 8, "steps": 6}}
RUNNERS = ["python", "node", "web", "chromium"]
LABELS = {"python": "Python runtime, onnxruntime (native)", "node": "JS in Node, onnxruntime-node (native)",
          "web": "JS in Node, onnxruntime-web (WASM, 1 thread)", "chromium": "JS in headless Chromium, onnxruntime-web (WASM, 1 thread)"}
START, END = "<!-- js:start -->", "<!-- js:end -->"

PY_ROW = """
import json, sys
import numpy as np
from edgetl.runtime import Trainer

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024

d = np.load(sys.argv[2])
x, y = d["x_train"], d["y_train"]
t = Trainer.load(sys.argv[1])
load = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
r = t.fit(x, y, epochs=1, seed=0)
print(json.dumps({"runtime": "python", "steps": r.steps, "step_ms_median": r.step_ms_median, "load_mb": load,
                  "peak_mb": status("VmHWM")}))
"""


def export_bundle(model: str, recipe: str, size: int, batch: int, out: Path) -> Path:
    import edgetl
    from edgetl.exporters import export

    pm = edgetl.prepare(model, recipe, num_classes=10, input_size=size)
    return export(pm, "onnx", out, edgetl.OptimizerConfig.make("sgd", lr=0.01, momentum=0.9), batch)


def synthetic_data(shape: tuple, batch: int, steps: int, out: Path) -> Path:
    """`steps` full batches of images in [0, 1] and random labels (the step cost does not depend on them)."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = batch * steps
    np.savez(out, x_train=rng.random((n, *shape), dtype=np.float32), y_train=rng.integers(0, 10, n),
             x_test=rng.random((batch, *shape), dtype=np.float32), y_test=rng.integers(0, 10, batch))
    return out


def run_row(runner: str, bundle: Path, data: Path, memory: bool, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = {"python": [sys.executable, "-c", PY_ROW, str(bundle), str(data)],
           "node": ["node", "bench/js_node.mjs", str(bundle), str(data), "node"],
           "web": ["node", "bench/js_node.mjs", str(bundle), str(data), "web"],
           "chromium": ["node", "bench/js_browser.mjs", str(bundle), str(data)]}[runner]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s"}
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_model(model: str, recipe: str, work: Path, runners: list[str], log) -> list[dict]:
    cfg = MODELS[model]
    log(f"{model}: exporting {recipe} (batch {cfg['batch']}, {cfg['size']}x{cfg['size']})")
    bundle = export_bundle(model, recipe, cfg["size"], cfg["batch"], work / f"{model}-bundle")
    shape = tuple(json.loads((bundle / "manifest.json").read_text())["input"]["shape"])
    data = synthetic_data(shape, cfg["batch"], cfg["steps"], work / f"{model}-data.npz")
    rows = []
    for runner in runners:
        # the WASM heap does not depend on malloc's settings: the browser runs once, for time and heap
        mem = run_row(runner, bundle, data, True, 1800) if runner != "chromium" else {}
        tim = run_row(runner, bundle, data, False, 1800)
        row = {"model": model, "recipe": recipe, "batch": cfg["batch"], "size": cfg["size"], "runner": runner,
               "steps": tim.get("steps"), "step_ms_median": tim.get("step_ms_median"),
               "load_mb": mem.get("load_mb"), "peak_mb": mem.get("peak_mb"),
               "wasm_mb": tim.get("wasm_mb", mem.get("wasm_mb")), "error": mem.get("error") or tim.get("error")}
        log(f"  {runner}: {json.dumps({k: v for k, v in row.items() if v is not None and k not in ('model', 'recipe', 'batch', 'size')})}")
        rows.append(row)
    return rows


def _f(v, fmt="{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    py = next((r for r in rows if r["runner"] == "python" and not r["error"]), {})
    lines = ["| runtime | step ms (median) | × Python time | RSS after load MB | peak RSS in fit MB | growth in fit MB | × Python peak | WASM heap MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {LABELS[r['runner']]} | failed: {r['error']} | | | | | | |")
            continue
        t = r["step_ms_median"] / py["step_ms_median"] if py.get("step_ms_median") and r["step_ms_median"] else None
        m = r["peak_mb"] / py["peak_mb"] if py.get("peak_mb") and r["peak_mb"] else None
        grow = r["peak_mb"] - r["load_mb"] if r["peak_mb"] is not None and r["load_mb"] is not None else None
        lines.append(f"| {LABELS[r['runner']]} | {_f(r['step_ms_median'])} | {_f(t, '{:.2f}×')} | {_f(r['load_mb'], '{:.1f}')} | "
                     f"{_f(r['peak_mb'], '{:.1f}')} | {_f(grow, '{:.1f}')} | {_f(m, '{:.2f}×')} | {_f(r['wasm_mb'], '{:.1f}')} |")
    return "\n".join(lines)


def section(results: list[dict], command: str, note: str) -> str:
    import onnxruntime

    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    chromium = subprocess.run(["sh", "runtime/js/scripts/ensure-chromium.sh"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    chromium_v = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip() if chromium else "?"
    web = json.loads((ROOT / "runtime/js/node_modules/onnxruntime-web/package.json").read_text())["version"]
    out = [START, "## The JavaScript runtime beside the Python one", "",
           f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()} "
           f"with onnxruntime {onnxruntime.__version__}, Node {node} with onnxruntime-node/-web {web}, {chromium_v}. {note}",
           "",
           "The same `onnx` bundle (SGD, momentum 0.9) fits one epoch of synthetic data (every batch full), each row a fresh "
           "process: the Python runtime, runtime/js in Node on onnxruntime-node (native) and on onnxruntime-web (WASM, one "
           "thread), and the demo page (runtime/js/demo) in headless Chromium (WASM, one thread, in a worker). Step time: "
           "median over the epoch (its first steps included), from a run without malloc settings. Memory, from a separate "
           "run with MALLOC_MMAP_THRESHOLD_=65536: resident set after loading (bundle, sessions, data) and its peak during "
           "the fit (VmHWM reset before it); for WASM also the heap onnxruntime-web grew to (a WebAssembly.Memory only "
           "grows). A browser's process memory is not measured: only its WASM heap.", ""]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        r0 = rows[0]
        out += [f"### {model}, {r0['recipe']}, {r0['size']}×{r0['size']}, batch {r0['batch']}, {r0['steps'] or '?'} steps", "",
                table(rows), ""]
    out.append(END)
    return "\n".join(out)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    if START in doc:
        doc = doc[:doc.index(START)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    p.add_argument("--recipe", default="bias+mask")
    p.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated, of " + ", ".join(RUNNERS))
    p.add_argument("--note", default="", help="a sentence for BENCHMARKS.md about the conditions (e.g. a loaded machine)")
    p.add_argument("--write", action="store_true", help="replace BENCHMARKS.md's JavaScript section")
    a = p.parse_args(argv)
    models, runners = a.models.split(","), a.runners.split(",")
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (choose from {', '.join(MODELS)})")
    for r in runners:
        if r not in RUNNERS:
            p.error(f"unknown runner {r!r} (choose from {', '.join(RUNNERS)})")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    with tempfile.TemporaryDirectory(prefix="edgetl-bench-js-") as tmp:
        for m in models:
            results += bench_model(m, a.recipe, Path(tmp), runners, log)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "js.json").write_text(json.dumps(results, indent=1) + "\n")
    command = "python bench/js.py" + "".join(f" --{k} {v}" for k, v in (("models", a.models), ("recipe", a.recipe), ("runners", a.runners))
                                             if v != p.get_default(k))
    text = section(results, command, a.note)
    print(text)
    if a.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
