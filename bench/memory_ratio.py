"""Measured/analytic step memory of bench rows, onnx target: `.venv/bin/python bench/memory_ratio.py TAG MODEL:RECIPE ...`
(128x128 batch 8; mnist_cnn 28x28 batch 32), each profiled by `edgetl.runtime profile` with MALLOC_MMAP_THRESHOLD_=65536."""
import json, os, subprocess, sys, tempfile
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
from worker import prepare
from edgetl.exporters import export
rows = [a.split(":") for a in sys.argv[2:]]
out = sys.argv[1]
for model, recipe in rows:
    d = f"{tempfile.gettempdir()}/edgetl_memratio_{model}_{recipe}_{out}"
    sz, bs = (28, 32) if model == "mnist_cnn" else (128, 8)
    b = export(prepare(model, recipe, sz), "onnx", d, batch_size=bs)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-m", "edgetl.runtime", "profile", str(b), "--steps", "3", "--json"],
                       capture_output=True, text=True, env=env)
    j = json.loads(r.stdout)
    print(model, recipe, f"measured {j['measured_peak_bytes']/2**20:.2f} MB analytic {j['analytic_step_bytes']/2**20:.2f} MB ratio {j['measured_vs_analytic']:.3f}", flush=True)
