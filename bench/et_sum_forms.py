"""ExecuTorch's portable `sum` on one conv bias gradient, by the form the step writes it: one program per form,
run alone by ExecuTorch's runtime on one thread (CPU ms, median of 5), its planned bytes and its error against
a float64 sum.

    python bench/et_sum_forms.py [N C H W]     (default 8 96 112 112: Lite0 224 b8's largest bias gradient)
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

FORMS = {
    "sum((0, 2, 3))": lambda g: g.sum((0, 2, 3)),
    "sum((2, 3)).sum(0)": lambda g: g.sum((2, 3)).sum(0),
    "sum(3).sum(2).sum(0)": lambda g: g.sum(3).sum(2).sum(0),
    "sum(0).sum((1, 2))": lambda g: g.sum(0).sum((1, 2)),  # Lowering.batch_first_bias_sum
}


class _Form(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, g):
        return self.fn(g)


def main(shape: tuple[int, ...]) -> None:
    os.environ["EDGETL_THREADS"] = "1"
    from edgetl.exporters.executorch import _lower, planned_bytes
    from edgetl.runtime.backends.executorch import NativeMethod

    g = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = g.astype(np.float64).sum((0, 2, 3))
    print(f"g {'x'.join(map(str, shape))}, one thread")
    for name, fn in FORMS.items():
        et = _lower(_Form(fn).eval(), (torch.from_numpy(g),), delegate=False)
        method = NativeMethod(et.buffer)
        ms = []
        for _ in range(5):
            (out,), t = method.timed([g])
            ms.append(t.sum())
        err = np.abs(out - ref).max() / np.abs(ref).max()
        mib = planned_bytes(et) / 2**20
        print(f"  {name:22s} {np.median(ms):7.2f} ms  planned {mib:6.2f} MiB  max rel err {err:.1e}")


if __name__ == "__main__":
    main(tuple(map(int, sys.argv[1:5])) if len(sys.argv) >= 5 else (8, 96, 112, 112))
