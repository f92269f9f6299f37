"""Whole-process memory of a bundle's training over loading and steps, stage by stage, torch-free.

    .venv/bin/python bench/et_load_memory.py BUNDLE [BUNDLE ...] [--keep-program] [--grow-workspace] [--steps 3]

Each bundle runs in a fresh child process with torch blocked and glibc returning every freed block
(MALLOC_MMAP_THRESHOLD_=65536, as `python -m edgetl.runtime profile` measures memory). After each
stage it records resident memory (VmRSS) and the process peak so far (VmHWM), both from /proc:
interpreter and runtime imported, bundle checked, each program restored / loaded / its freed pages
released (ExecuTorch) or its session created (onnx), state set, a warm-up step, the measured steps;
and the resident pages of shared libraries (code), which runtimes page in at different times
(onnxruntime's mostly at import, ExecuTorch's while programs load and run). The summary gives the
whole process peak (code included) and, as `profile`'s `whole_above_libraries_bytes`, the peak above
the level before any program less the library pages paged in since (`runtime/backends/base.py`).
`--keep-program` loads ExecuTorch programs as before: every page kept, no packed weights shared.
`--grow-workspace`: XNNPACK's workspace is not sized at load but grows during the first step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

MB = 2**20


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def child(path: str, steps: int, keep: bool, grow: bool) -> list[dict]:
    from edgetl.runtime.notorch import block_torch

    block_torch()
    rows: list[dict] = []

    def stage(name: str) -> None:
        rows.append({"stage": name, "rss": _kb("VmRSS"), "peak": _kb("VmHWM"), "libraries": library_rss_bytes()})

    import numpy as np

    from edgetl.runtime.backends.base import Resident, above_libraries, library_rss_bytes
    from edgetl.runtime.bundle import load_bundle
    from edgetl.runtime.trainer import Trainer

    stage("python, numpy, edgetl.runtime imported")
    bundle = load_bundle(path)
    stage("bundle checked (manifest, initial state)")
    if bundle.target == "executorch":
        from edgetl.runtime.backends.executorch import ExecuTorchBackend, _lib

        _lib()
        stage("ExecuTorch runtime libraries loaded")
        backend = ExecuTorchBackend(bundle, release_program=not keep, share_weights=not keep,
                                     presize_workspace=not grow, on_stage=stage)
    else:
        import onnxruntime  # noqa: F401

        stage("onnxruntime imported")
        from edgetl.runtime.backends import make_backend

        backend = make_backend(bundle)
        stage("train_step and eval sessions created")
    trainer = Trainer(bundle, backend)
    stage("trainer ready (parameters, optimizer state)")
    rng = np.random.default_rng(0)
    x = rng.random((bundle.batch_size, *bundle.input_shape), dtype=np.float32)
    y = rng.integers(0, bundle.num_classes, bundle.batch_size).astype(np.int64)
    x, y = trainer._xy(x, y)
    stage("batch normalized")
    lr = trainer.lr_at(0)
    trainer._train_step(x, y, lr, check=False)
    stage("warm-up step")
    for _ in range(steps):
        trainer._train_step(x, y, lr, check=False)
    stage(f"{steps} steps")
    above = above_libraries(rows[-1]["peak"], backend.before_programs, Resident.now())
    return {"stages": rows, "whole_above_libraries_bytes": above}


def main(argv: list[str]) -> None:
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 3
    keep = "--keep-program" in argv
    grow = "--grow-workspace" in argv
    bundles = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--steps")]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for b in bundles:
        cmd = [sys.executable, __file__, "--child", b, str(steps), "1" if keep else "0", "1" if grow else "0"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{b}: {r.stderr.strip().splitlines()[-1]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        rows = out["stages"]
        print(f"\n{b}{' (--keep-program)' if keep else ''}{' (--grow-workspace)' if grow else ''}\n"
              "| stage | RSS MB | Δ MB | of it libraries MB | peak so far MB |\n|---|---:|---:|---:|---:|")
        prev = rows[0]["rss"]
        for row in rows:
            print(f"| {row['stage']} | {row['rss'] / MB:.1f} | {(row['rss'] - prev) / MB:+.1f} | "
                  f"{row['libraries'] / MB:.1f} | {row['peak'] / MB:.1f} |")
            prev = row["rss"]
        print(f"whole process peak: {rows[-1]['peak'] / MB:.1f} MB (libraries' code included); above the "
              f"runtime's libraries (profile's whole_above_libraries_bytes): {out['whole_above_libraries_bytes'] / MB:.1f} MB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1")))
    else:
        main(sys.argv[1:])
