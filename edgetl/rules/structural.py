"""Layers without weights of their own, and a standalone BatchNorm as a per-channel affine."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Rule, sum_to


class Identity(Rule):
    """Dropout (identity in the lean step, which is deterministic) and no-op reshapes."""

    kind = "identity"

    def compute(self, xs, w):
        return xs[0]

    def backward(self, g, kept, w, need):
        return [g], {}


class Flatten(Rule):
    kind = "flatten"

    def compute(self, xs, w):
        return xs[0].flatten(1)

    def backward(self, g, kept, w, need):
        return [g.reshape(-1, *self.in_shapes[0])], {}


class Add(Rule):
    kind = "add"

    def compute(self, xs, w):
        return xs[0] + xs[1]

    def backward(self, g, kept, w, need):
        return [sum_to(g, s) if n else None for s, n in zip(self.in_shapes, need.inputs)], {}


class Mul(Rule):
    """Elementwise product with broadcasting (squeeze-excite gating)."""

    kind = "mul"

    def compute(self, xs, w):
        return xs[0] * xs[1]

    def keep(self, xs, y, w, need):
        kept = {}
        if need.inputs[0]:
            kept["b"] = xs[1]
        if need.inputs[1]:
            kept["a"] = xs[0]
        return kept

    def backward(self, g, kept, w, need):
        ga = sum_to(g * kept["b"], self.in_shapes[0]) if need.inputs[0] else None
        gb = sum_to(g * kept["a"], self.in_shapes[1]) if need.inputs[1] else None
        return [ga, gb], {}


class Concat(Rule):
    kind = "concat"

    def compute(self, xs, w):
        return torch.cat(xs, 1)

    def backward(self, g, kept, w, need):
        grads, start = [], 0
        for shape, needed in zip(self.in_shapes, need.inputs):
            grads.append(g[:, start : start + shape[0]] if needed else None)
            start += shape[0]
        return grads, {}


class Affine(Rule):
    """A BatchNorm that follows no conv: y = x * weight + bias per channel (eval statistics),
    on (N, C), (N, C, L) or (N, C, H, W)."""

    kind = "affine"

    def _c(self, t):
        return t.reshape(1, -1, *([1] * (len(self.in_shapes[0]) - 1)))

    def _sum(self, t):
        return t.sum((0, *range(2, 1 + len(self.in_shapes[0]))))

    def compute(self, xs, w):
        return xs[0] * self._c(w["weight"]) + self._c(w["bias"])

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if "weight" in need.params else {}

    def backward(self, g, kept, w, need):
        grads = {}
        if "bias" in need.params:
            grads["bias"] = self._sum(g)
        if "weight" in need.params:
            grads["weight"] = self._sum(g * kept["x"])
        gx = g * self._c(w["weight"]) if need.inputs[0] else None
        return [gx], grads


class Pad(Rule):
    """ZeroPad2d that could not be folded into a following conv."""

    kind = "pad"

    def __init__(self, pads: tuple[int, int, int, int]):
        self.pads = pads  # (left, right, top, bottom) as F.pad takes them

    def compute(self, xs, w):
        return F.pad(xs[0], self.pads)

    def backward(self, g, kept, w, need):
        l, r, t, b = self.pads
        _, h, wd = self.out_shape
        return [g[:, :, t : h - b, l : wd - r].clone()], {}
