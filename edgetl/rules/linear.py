"""Linear (fully connected) layer."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Rule


class Linear(Rule):
    kind = "linear"
    quantizable = True

    def compute(self, xs, w):
        return F.linear(xs[0], w["weight"], w.get("bias"))

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if "weight" in need.params else {}

    def backward(self, g, kept, w, need):
        grads = {}
        if "bias" in need.params:
            grads["bias"] = g.sum(0)
        if "weight" in need.params:
            grads["weight"] = g.t() @ kept["x"]
        gx = g @ w["weight"] if need.inputs[0] else None
        return [gx], grads
