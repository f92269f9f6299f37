"""Measured/analytic step memory of bench rows: `.venv/bin/python bench/memory_ratio.py TAG MODEL:RECIPE[:SIZE[:TARGET]] ...`
(128x128 batch 8 unless SIZE is given; mnist_cnn 28x28 batch 32; TARGET onnx (default) or executorch), each exported as
bench/run.py exports it (SGD, momentum 0.9) and profiled by `edgetl.runtime profile --steps 3` in its own process with
MALLOC_MMAP_THRESHOLD_=65536 and one compute thread (EDGETL_THREADS=1), as bench/run.py measures memory."""
import json, os, subprocess, sys, tempfile
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
import edgetl
from worker import prepare
from edgetl.exporters import export
rows = [a.split(":") for a in sys.argv[2:]]
out = sys.argv[1]
for model, recipe, *rest in rows:
    size, target = (rest + [None, None])[:2]
    target = target or "onnx"
    d = f"{tempfile.gettempdir()}/edgetl_memratio_{model}_{recipe}_{target}_{out}"
    sz, bs = (28, 32) if model == "mnist_cnn" else (int(size) if size else 128, 8)
    b = export(prepare(model, recipe, sz), target, d, edgetl.OptimizerConfig.make("sgd", lr=0.01, momentum=0.9), bs)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "EDGETL_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(b), "--steps", "3", "--json"],
                       capture_output=True, text=True, env=env)
    j = json.loads(r.stdout)
    print(model, sz, recipe, target, f"measured {j['measured_peak_bytes']/2**20:.2f} MB analytic {j['analytic_step_bytes']/2**20:.2f} MB ratio {j['measured_vs_analytic']:.3f}", flush=True)
