"""Where an `executorch` bundle's train step spends its time: each instruction of the program (an
operator on ExecuTorch's own kernels, or an XNNPACK delegate call) timed as thread CPU time, on one
thread (ExecuTorch's pool at 1), the median over several steps; totals per operator and the slowest
instructions with their tensors' shapes.

    python bench/et_step_profile.py [--steps N] [--top K] BUNDLE

The runtime runs the method one instruction at a time (`Method::step`) for this; the program is read
on the host (ExecuTorch's own deserializer) to name each instruction.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from edgetl.runtime.backends.base import THREADS_VAR


def instructions(pte: bytes) -> list[tuple[str, list[str]]]:
    """(label, shapes of its tensor arguments) per instruction of the program's first chain, in order:
    the operator's name, or `xnnpack` for a delegate call."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from edgetl.runtime.backends.executorch_q8 import is_packed, unpack

    data = bytes(unpack(pte)) if is_packed(pte) else pte
    plan = deserialize_pte_binary(data).program.execution_plan[0]
    out = []
    for ins in plan.chains[0].instructions:
        a = ins.instr_args
        label = plan.operators[a.op_index].name if hasattr(a, "op_index") else \
            "xnnpack" if hasattr(a, "delegate_index") else type(a).__name__
        shapes = []
        for v in getattr(a, "args", []):
            val = plan.values[v].val
            if type(val).__name__ == "Tensor":
                shapes.append(f"{'x'.join(map(str, val.sizes))}:{val.scalar_type.name.lower()}")
        out.append((label, shapes))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    os.environ[THREADS_VAR] = "1"
    from edgetl.runtime.backends.executorch import ExecuTorchBackend
    from edgetl.runtime.bundle import load_bundle

    bundle = load_bundle(a.bundle)
    backend = ExecuTorchBackend(bundle)
    names = instructions(bundle.program_bytes("train_step"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((bundle.batch_size, *bundle.input_shape)).astype(np.float32)
    y = rng.integers(0, bundle.num_classes, bundle.batch_size).astype(np.int64)
    lr = np.float32(1e-3)
    runs = []
    for i in range(a.steps + 1):
        _, ms = backend.train.timed([x, y, lr, *backend.params, *backend.state])
        if i:
            runs.append(ms)
    ms = np.median(np.stack(runs), axis=0)
    assert len(ms) == len(names), (len(ms), len(names))
    total = ms.sum()
    print(f"{a.bundle}: {len(ms)} instructions, {total:.1f} ms per step (median per instruction over {a.steps} steps)")
    per: dict[str, list[float]] = {}
    for (label, _), t in zip(names, ms):
        per.setdefault(label, []).append(t)
    print(f"{'operator':40s} {'calls':>5s} {'ms':>8s} {'share':>6s}")
    for label, ts in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"{label:40s} {len(ts):5d} {sum(ts):8.1f} {100 * sum(ts) / total:5.1f}%")
    print(f"slowest {a.top} instructions:")
    for i in np.argsort(-ms)[: a.top]:
        label, shapes = names[i]
        print(f"  #{i:<4d} {label:28s} {ms[i]:7.2f} ms  {' '.join(shapes)[:110]}")


if __name__ == "__main__":
    main()
