"""The benchmark runs (one small model, a few rows), so it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    md, js = tmp_path / "B.md", tmp_path / "b.json"
    r = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--out", str(md), "--json", str(js)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(js.read_text())["rows"]
    systems = {row["system"] for row in rows}
    assert {"torch", "ort-training", "edgetl-onnx"} <= systems
    assert all("error" not in row for row in rows), [row.get("error") for row in rows]
    assert all(row["measured_peak_bytes"] > 0 and row["step_ms_median"] > 0 for row in rows)
    # the step's CPU time on one thread; the whole life's memory (loading included); what measured it
    assert all(row["step_cpu_ms_median"] > 0 and row["threads"] == 1 for row in rows), rows
    assert all(row["whole_above_libraries_bytes"] >= row["measured_peak_bytes"] for row in rows), rows
    assert all(row["versions"].get("onnxruntime" if row["system"] != "torch" else "torch") for row in rows), rows
    assert all(row["host_versions"]["torch"] and row["run"] == rows[0]["run"] for row in rows), rows
    # memory and time from separate runs: time never from a run with the memory setting
    assert all(row["memory_run"]["allocator"] == "MALLOC_MMAP_THRESHOLD_=65536" for row in rows), rows
    assert all(row["time_run"]["allocator"] == "default" for row in rows), rows
    lean = next(row for row in rows if row["system"] == "edgetl-onnx")
    assert lean["x_less_than_torch_full"] > 0 and lean["x_less_than_ort_same_set"] > 0 and lean["step_x_torch_full"] > 0
    # a micro-batch row: its step holds 2 samples' activations (plus the accumulators), not 8
    micro = next(row for row in rows if row.get("micro_batch") == 2)
    assert micro["recipe"] == "bias+mask" and micro["analytic_step_bytes"] < lean["analytic_step_bytes"]
    assert micro["step_x_torch_full"] > 0 and micro["x_less_than_torch_full"] > 0
    text = md.read_text()
    assert "<!-- memory:start -->" in text and "| edgetl lean step, onnxruntime | bias+mask |" in text
    assert "| edgetl lean step, onnxruntime, micro-batch 2 | bias+mask |" in text
