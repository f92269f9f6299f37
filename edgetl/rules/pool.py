"""Pooling. Only non-overlapping windows (kernel == stride, no padding) have rules; they cover the
supported models and their backward needs no scatter."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Rule, upsample_to


class MaxPool2d(Rule):
    """Keeps a boolean mask of the window maxima (first maximum on ties, as torch does)."""

    kind = "maxpool"

    def __init__(self, k: int):
        self.k = k

    def compute(self, xs, w):
        return F.max_pool2d(xs[0], self.k, self.k)

    def forward(self, xs, w, need):
        if not need.inputs[0]:
            return self.compute(xs, w), {}
        y, idx = F.max_pool2d(xs[0], self.k, self.k, return_indices=True)
        hw = tuple(self.in_shapes[0][1:])
        where = upsample_to(idx, self.k, hw, fill=-1)
        pos = torch.arange(hw[0] * hw[1], device=idx.device).reshape(1, 1, *hw)
        return y, {"m": where == pos}

    def backward(self, g, kept, w, need):
        up = upsample_to(g, self.k, tuple(self.in_shapes[0][1:]))
        return [up * kept["m"].to(g.dtype)], {}

    def describe(self) -> str:
        return f"maxpool{self.k}"


class AvgPool2d(Rule):
    kind = "avgpool"

    def __init__(self, k: int):
        self.k = k

    def compute(self, xs, w):
        return F.avg_pool2d(xs[0], self.k, self.k)

    def backward(self, g, kept, w, need):
        return [upsample_to(g / (self.k * self.k), self.k, tuple(self.in_shapes[0][1:]))], {}

    def describe(self) -> str:
        return f"avgpool{self.k}"


class GlobalAvgPool(Rule):
    kind = "global_avgpool"

    def compute(self, xs, w):
        return xs[0].mean((2, 3), keepdim=True)

    def backward(self, g, kept, w, need):
        c, h, wd = self.in_shapes[0]
        return [(g / (h * wd)).expand(g.shape[0], c, h, wd)], {}
