"""Micro-batches inside the exported step (issue 12 goal 1): whole training memory and step CPU time of
edgetl's onnx step at EfficientNet-Lite0 224 batch 8, bias+mask and side+mask, with micro-batches of
8 (none), 4, 2 and 1, beside torch eager full fine-tuning, each row in its own process.

    python bench/micro_batch.py export OUT_DIR            # the bundles (host, torch)
    python bench/micro_batch.py measure OUT_DIR [STEPS]   # every row: memory run, then time run
    python bench/micro_batch.py row KIND ARG STEPS        # one row (a child of `measure`)

Method as bench/run.py's (branch L): memory from a run with MALLOC_MMAP_THRESHOLD_=65536, as the peak
RSS over the process's whole life (loading, a warm-up step, the measured steps) above its level once its
libraries were imported (torch: after a toy conv + optimizer step, torch's lazy set-up); step CPU time
(the process's, all threads) from a separate run with the default allocator. torch runs one thread;
onnxruntime its default pool (CPU time counts every thread).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL, SIZE, BATCH, CLASSES = "efficientnet_lite0", 224, 8, 10
RECIPES = ("bias+mask", "side+mask")
MICRO = (8, 4, 2, 1)
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "OMP_NUM_THREADS": "1",
       "EDGETL_THREADS": "1"}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _steps(step, steps: int) -> dict:
    step()  # warm-up
    cpu = []
    for _ in range(steps):
        t0 = time.process_time()
        step()
        cpu.append(1000 * (time.process_time() - t0))
    cpu.sort()
    return {"step_cpu_ms_median": cpu[len(cpu) // 2], "step_cpu_ms_min": cpu[0]}


def row_edgetl(bundle: str, steps: int) -> dict:
    import numpy as np
    import onnxruntime  # noqa: F401  the runtime's libraries, before the baseline
    from edgetl.runtime import Trainer

    base = _status_kb("VmRSS")
    t = Trainer.load(bundle)
    b = t.bundle
    rng = np.random.default_rng(0)
    x = rng.random((b.batch_size, *b.input_shape), dtype=np.float32)
    y = rng.integers(0, b.num_classes, b.batch_size).astype(np.int64)
    out = _steps(lambda: t.train_step(x, y, check=False), steps)
    return {**out, "whole_bytes": (_status_kb("VmHWM") - base) * 1024, "micro_batch": b.micro_batch,
            "analytic_step_bytes": b.manifest["analytic_memory"]["analytic_peak_bytes"]}


def row_torch_full(_: str, steps: int) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(1)
    toy = nn.Conv2d(3, 4, 3)  # torch's lazy set-up, as bench/worker.py does, before the baseline
    opt = torch.optim.SGD(toy.parameters(), lr=0.1, momentum=0.9)
    toy(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()
    from edgetl.backbones import load_backbone

    base = _status_kb("VmRSS")
    bb = load_backbone(MODEL)
    net = bb.model.train()
    parent, _, leaf = bb.head.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    setattr(owner, leaf, nn.Linear(getattr(owner, leaf).in_features, CLASSES))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, bb.in_channels, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    out = _steps(step, steps)
    return {**out, "whole_bytes": (_status_kb("VmHWM") - base) * 1024}


def export_all(out: Path) -> None:
    import edgetl
    from edgetl.exporters import export

    for recipe in RECIPES:
        pm = edgetl.prepare(MODEL, recipe, num_classes=CLASSES, input_size=SIZE)
        for m in MICRO:
            d = out / f"{recipe}-m{m}"
            if not (d / "manifest.json").exists():
                export(pm, "onnx", d, batch_size=BATCH, micro_batch=m)
                print("exported", d, flush=True)


def _child(kind: str, arg: str, steps: int, memory: bool) -> dict:
    env = {**ENV, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if memory else {})}
    p = subprocess.run([sys.executable, __file__, "row", kind, arg, str(steps)], env=env, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(out: Path, steps: int) -> list[dict]:
    rows = [("torch-full", "", "torch eager, full fine-tuning", None)]
    rows += [("edgetl", str(out / f"{r}-m{m}"), f"edgetl {r}, onnx", m) for r in RECIPES for m in MICRO]
    results = []
    for kind, arg, name, m in rows:
        mem, tim = _child(kind, arg, steps, True), _child(kind, arg, steps, False)
        r = {"row": name, "micro_batch": m, "whole_bytes": mem["whole_bytes"],
             "analytic_step_bytes": mem.get("analytic_step_bytes"),
             "step_cpu_ms_median": tim["step_cpu_ms_median"], "step_cpu_ms_min": tim["step_cpu_ms_min"]}
        results.append(r)
        print(json.dumps(r), flush=True)
    base = results[0]
    for r in results:
        r["whole_x_less_than_torch_full"] = base["whole_bytes"] / r["whole_bytes"]
        r["step_x_torch_full"] = r["step_cpu_ms_median"] / base["step_cpu_ms_median"]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "export":
        export_all(Path(sys.argv[2]))
    elif cmd == "measure":
        for r in measure(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 5):
            print(r)
    elif cmd == "row":
        fn = row_edgetl if sys.argv[2] == "edgetl" else row_torch_full
        print(json.dumps(fn(sys.argv[3], int(sys.argv[4]))))
