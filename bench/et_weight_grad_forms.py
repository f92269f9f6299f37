"""A dense 3x3 conv with a computed kernel in ExecuTorch's XNNPACK lowering, as the `full` step writes it: its forward
and its weight gradient as a matmul per kernel tap against one matmul for all taps
(`Lowering.few_channel_conv_one_matmul_max_cin`). One program per form, run alone on one thread (CPU ms, median of
9), and the error against float64.

    python bench/et_weight_grad_forms.py [N CIN COUT HW]     (default 32 1 32 28: mnist_cnn's stem, b32)
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch


def main(n: int, cin: int, cout: int, hw: int) -> None:
    os.environ["EDGETL_THREADS"] = "1"
    import edgetl
    from edgetl.exporters.executorch import _lower
    from edgetl.runtime.backends.executorch import NativeMethod

    net = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(cout * hw * hw, 2))
    rule = edgetl.prepare(net, "full", num_classes=2, input_shape=(cin, hw, hw)).graph.nodes[0].rule

    class Form(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x, second):
            return self.fn(x, second)

    torch.manual_seed(0)
    x, w, g = torch.randn(n, cin, hw, hw), torch.randn(cout, cin, 3, 3), torch.randn(n, cout, hw, hw)
    y_ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).numpy()
    dw_ref = torch.nn.grad.conv2d_weight(x.double(), (cout, cin, 3, 3), g.double(), padding=1).numpy()
    print(f"x {n}x{cin}x{hw}x{hw}, {cout} output channels, 3x3 kernel, one thread")
    forms = (("forward, a matmul per tap", lambda x, w: rule._taps(x, rule._forward_taps(w), rule.pads,
                                                                   rule.out_chw[1:], rule.stride), w, y_ref),
             ("forward, one matmul", rule._forward_one_mm, w, y_ref),
             ("dW, a matmul per tap", rule._weight_grad_taps_mm, g, dw_ref),
             ("dW, one matmul", rule._weight_grad_one_mm, g, dw_ref))
    for name, fn, second, ref in forms:
        method = NativeMethod(_lower(Form(fn).eval(), (x, second), delegate=True).buffer)
        ms = []
        for _ in range(9):
            (out,), t = method.timed([x.numpy(), second.numpy()])
            ms.append(t.sum())
        err = np.abs(out - ref).max() / np.abs(ref).max()
        print(f"  {name:26s} {np.median(ms):7.2f} ms  {len(t):3d} instructions  max rel err {err:.1e}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5])) if len(sys.argv) >= 5 else main(32, 1, 32, 28)
