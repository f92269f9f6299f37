"""A frozen 1x1 conv in ExecuTorch's XNNPACK delegate, as the step writes it: a conv with its fp32 constant weight
(XNNPACK packs it fp32) against a linear over the channels-last view whose weight is dequantized from int8 by the
op (XNNPACK's f32_qc8w fully connected, `Lowering.int8_pointwise_linear`). One program per form, run alone on one
thread (CPU ms, median of 7), its modelled workspace, the program's bytes and the error against float64.

    python bench/et_pointwise_forms.py [N CIN COUT HW]     (default 8 16 96 112: Lite0 224 b8's first expand)
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


def main(n: int, cin: int, cout: int, hw: int) -> None:
    os.environ["EDGETL_THREADS"] = "1"
    from edgetl.exporters.et_workspace import delegate_inner_bytes
    from edgetl.exporters.executorch import _lower
    from edgetl.quant import dequantize_weight_op
    from edgetl.runtime.backends.executorch import NativeMethod

    torch.manual_seed(0)
    q = torch.randint(-127, 128, (cout, cin), dtype=torch.int8)
    scale = torch.rand(cout) * 0.01 + 1e-3
    fp32 = (q.float() * scale[:, None]).reshape(cout, cin, 1, 1)

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", fp32.clone())

        def forward(self, x):
            return F.conv2d(x, self.w)

    class Int8Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("q", q)
            self.register_buffer("s", scale)

        def forward(self, x):
            return F.linear(x.permute(0, 2, 3, 1), dequantize_weight_op(self.q, self.s)).permute(0, 3, 1, 2)

    x = torch.randn(n, cin, hw, hw)
    ref = F.conv2d(x.double(), fp32.double()).numpy()
    print(f"x {n}x{cin}x{hw}x{hw} -> {cout} channels, one thread")
    for name, module in (("conv, fp32 weight", Conv()), ("linear, int8 weight", Int8Linear())):
        et = _lower(module.eval(), (x,), delegate=True)
        method = NativeMethod(et.buffer)
        ms = []
        for _ in range(7):
            (y,), t = method.timed([x.numpy()])
            ms.append(t.sum())
        err = np.abs(y - ref).max() / np.abs(ref).max()
        ws = max(delegate_inner_bytes(et) or [0]) / 2**20
        print(f"  {name:20s} {np.median(ms):7.2f} ms  workspace {ws:6.2f} MiB  program {len(et.buffer) / 1e3:7.1f} kB"
              f"  max rel err {err:.1e}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5])) if len(sys.argv) >= 5 else main(8, 16, 96, 112)
