"""Step time of `onnx` and `executorch` bundles (and optionally torch eager full fine-tuning) side by side
in one process: one thread each, the programs' steps interleaved A B A B ..., so a comparison holds when
the machine's speed drifts (a shared machine's did by 1.5x within minutes). Each step's CPU time on the
calling thread is measured besides its wall time: with one intra-op thread onnxruntime and torch compute
on the caller, and ExecuTorch's pool is sized to one thread (EDGETL_THREADS=1, set here), so XNNPACK and
the optimized kernels compute on the caller too; CPU time then excludes the time the process waited for a
core. The process's CPU time (all threads) is reported too: it must match. Ratios are paired per round.

    python bench/step_ab.py [--steps N] [--torch-full MODEL SIZE BATCH] BUNDLE [BUNDLE ...]

e.g. ExecuTorch vs onnx, same recipe: `python bench/step_ab.py --steps 8 /tmp/lite0-onnx /tmp/lite0-et`.

Step time only: memory comes from `python -m edgetl.runtime profile` in its own run.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgetl.runtime.backends.base import THREADS_VAR


def onnx_step(path: str) -> Callable[[], None]:
    """A closure running one train step of the bundle at `path` with one intra-op thread, feeding the
    updated parameters and state back as the Trainer does."""
    from edgetl.runtime.backends.onnx import TRAIN_DISABLED_OPTIMIZERS, OnnxBackend, session_options
    from edgetl.runtime.bundle import load_bundle
    import onnxruntime as ort

    bundle = load_bundle(path)
    backend = OnnxBackend(bundle)
    so = session_options()
    so.intra_op_num_threads = 1
    backend.train = ort.InferenceSession(bundle.program_bytes("train_step"), so, providers=["CPUExecutionProvider"],
                                         disabled_optimizers=TRAIN_DISABLED_OPTIMIZERS)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((bundle.batch_size, *bundle.input_shape)).astype(np.float32)
    y = rng.integers(0, bundle.num_classes, bundle.batch_size).astype(np.int64)
    return lambda: backend.train_step(x, y, 1e-3)


def executorch_step(path: str) -> Callable[[], None]:
    """As onnx_step, for an `executorch` bundle (the Trainer's backend, its pool at one thread)."""
    from edgetl.runtime.backends.executorch import ExecuTorchBackend
    from edgetl.runtime.bundle import load_bundle

    bundle = load_bundle(path)
    backend = ExecuTorchBackend(bundle)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((bundle.batch_size, *bundle.input_shape)).astype(np.float32)
    y = rng.integers(0, bundle.num_classes, bundle.batch_size).astype(np.int64)
    return lambda: backend.train_step(x, y, 1e-3)


def bundle_step(path: str) -> Callable[[], None]:
    from edgetl.runtime.bundle import load_bundle

    target = load_bundle(path).manifest["target"]
    steps = {"onnx": onnx_step, "executorch": executorch_step}
    if target not in steps:
        raise SystemExit(f"{path}: a '{target}' bundle; this bench runs {sorted(steps)}")
    return steps[target](path)


def torch_full_step(model: str, size: int, batch: int) -> Callable[[], None]:
    """Full fine-tuning as bench/worker.py's torch-full row, on one thread."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from edgetl.backbones import load_backbone

    torch.set_num_threads(1)
    bb = load_backbone(model)
    net = bb.model.train()
    parent, _, leaf = bb.head.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    setattr(owner, leaf, nn.Linear(getattr(owner, leaf).in_features, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, bb.in_channels, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--steps", type=int, default=20, help="measured steps of each, after one warm-up step")
    p.add_argument("--torch-full", nargs=3, metavar=("MODEL", "SIZE", "BATCH"))
    a = p.parse_args()
    os.environ[THREADS_VAR] = "1"  # before any ExecuTorch program loads: its pool keeps the size it had then
    runs = {b: bundle_step(b) for b in a.bundles}
    if a.torch_full:
        m, size, batch = a.torch_full
        runs = {f"torch eager full {m} {size} b{batch}": torch_full_step(m, int(size), int(batch))} | runs
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    proc: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(a.steps + 1):
        for k, step in runs.items():
            c, pc, t = time.thread_time(), time.process_time(), time.perf_counter()
            step()
            if i:
                wall[k].append(1000 * (time.perf_counter() - t))
                cpu[k].append(1000 * (time.thread_time() - c))
                proc[k].append(1000 * (time.process_time() - pc))
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, one thread, {a.steps} steps each, interleaved; ms per step")
    first = next(iter(runs))
    for k in runs:
        ratio = np.array(cpu[k]) / np.array(cpu[first])
        print(f"  {k[-48:]:48s} wall median {np.median(wall[k]):7.1f}  cpu median {np.median(cpu[k]):7.1f} "
              f"min {min(cpu[k]):7.1f}  process cpu median {np.median(proc[k]):7.1f}  "
              f"cpu vs first (paired median) {np.median(ratio):.3f}")


if __name__ == "__main__":
    main()
