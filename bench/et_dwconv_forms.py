"""Forms of a TF-same (asymmetrically padded) stride-2 depthwise conv's forward in ExecuTorch's XNNPACK delegate,
timed alone at EfficientNet-Lite0 224 b8's shapes: one program per form (the exporter's own lowering:
torch.export, XNNPACK partitioner), each call's thread CPU time on one thread (median), and each form's
max abs difference from torch's conv of the explicitly padded input.

    EDGETL_THREADS=1 python bench/et_dwconv_forms.py [--reps 7] [--prelude] [--forms A,B] [--shapes 0,1]

`--prelude` (depthwise shapes): the conv's input is made inside the same call (a 1x1 expand conv + bias + ReLU6,
as in Lite0's blocks) instead of being a program input, so a channels-last value reaches the pad (XNNPACK can
fold a zero pad into the conv that reads it only when nothing sits between them). The first program of a run
can read slow (warm-up): vary the order of `--forms`. Results: BENCHMARKS.md, task E.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from edgetl.runtime.backends.base import THREADS_VAR

# (channels, size, kernel, input channels of a dense conv): Lite0 224's stride-2 depthwise convs, then its
# dense stem (3 -> 32 channels), batch 8
SHAPES = [(96, 112, 3, None), (144, 56, 5, None), (240, 28, 3, None), (672, 14, 5, None), (32, 224, 3, 3)]
BATCH = 8


def tf_same_pads(size: int, k: int, s: int = 2) -> tuple[int, int]:
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Form(torch.nn.Module):
    def __init__(self, form: str, c: int, size: int, k: int, prelude: bool, dense_in: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.form, self.size, self.k = form, size, k
        self.groups = 1 if dense_in else c
        self.register_buffer("w", torch.randn(c, dense_in or 1, k, k, generator=g))
        self.prelude = prelude
        if prelude:
            self.register_buffer("w1", torch.randn(dense_in or c, (dense_in or c) // 6, 1, 1, generator=g) * 0.3)
        self.before, self.after = tf_same_pads(size, k)

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.prelude:
            x = F.hardtanh(F.conv2d(x, self.w1) + b.reshape(1, -1, 1, 1), 0.0, 6.0)
        c, lo, hi = self.groups, self.before, self.after
        if self.form == "zero_taps":  # today's pads_in_kernel: symmetric max pad, zero taps on the side padded less
            w = F.pad(self.w, (hi - lo, 0, hi - lo, 0))
            return F.conv2d(x, w, None, 2, hi, 1, c)
        if self.form == "pad_op":  # an explicit zero pad, then the k x k conv unpadded
            return F.conv2d(F.pad(x, (lo, hi, lo, hi)), self.w, None, 2, 0, 1, c)
        if self.form == "pad_nhwc":  # the zero pad of a channels-last view, then the k x k conv unpadded
            xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, lo, hi, lo, hi)).permute(0, 3, 1, 2)
            return F.conv2d(xp, self.w, None, 2, 0, 1, c)
        if self.form == "shift_slice":  # the task's suggestion: pad hi over x[..., 1:, 1:]
            return F.conv2d(x[:, :, 1:, 1:], self.w, None, 2, hi, 1, c)
        if self.form == "sym_lo":  # NOT the same conv (speed reference): the k x k kernel, symmetric pad lo..
            return F.conv2d(x, self.w, None, 2, (self.k - 1) // 2, 1, c)
        raise ValueError(self.form)

    def reference(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.prelude:
            x = F.hardtanh(F.conv2d(x, self.w1) + b.reshape(1, -1, 1, 1), 0.0, 6.0)
        pads = (self.before, self.after) * 2
        return F.conv2d(F.pad(x, pads), self.w, None, 2, 0, 1, self.groups)


FORMS = ["zero_taps", "pad_op", "pad_nhwc", "shift_slice", "sym_lo"]


def program(m: Form, args: tuple) -> bytes:
    from edgetl.exporters.executorch import _lower

    return _lower(m, args, delegate=True).buffer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--prelude", action="store_true")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--shapes", default="0,1,2,3", help="indices into SHAPES (4: the dense stem)")
    a = p.parse_args()
    os.environ[THREADS_VAR] = "1"
    from edgetl.runtime.backends.executorch import NativeMethod

    for i in map(int, a.shapes.split(",")):
        c, size, k, dense_in = SHAPES[i]
        conv_in = dense_in or c
        x = torch.randn(BATCH, conv_in // 6 if a.prelude else conv_in, size, size)
        b = torch.randn(conv_in) if a.prelude else torch.zeros(1)
        for form in a.forms.split(","):
            m = Form(form, c, size, k, a.prelude, dense_in)
            ref = m.reference(x, b)
            method = NativeMethod(program(m, (x, b)))
            ins = [x.numpy(), b.numpy()][: len(method.inputs)]
            out = method(ins)[0]
            err = float(np.abs(out - ref.numpy()).max()) if out.shape == tuple(ref.shape) else float("nan")
            times = []
            for _ in range(a.reps):
                t = time.thread_time()
                method(ins)
                times.append((time.thread_time() - t) * 1e3)
            print(f"{BATCH}x{conv_in}x{size}x{size} k{k} g{m.groups} {form:12s} {np.median(times):8.2f} ms  "
                  f"max|diff| {err:.2e}  planned {method.planned_bytes / 2**20:.1f} MiB", flush=True)
            del method


if __name__ == "__main__":
    main()
