"""Linear (fully connected) layer, on feature vectors or on the last dim of tokens (..., D)."""
from __future__ import annotations

import torch.nn.functional as F

from ..lowering import separate_bias
from .base import Rule


class Linear(Rule):
    kind = "linear"
    quantizable = True

    def compute(self, xs, w):
        if "bias" in w and separate_bias(w):
            return F.linear(xs[0], w["weight"]) + w["bias"]
        return F.linear(xs[0], w["weight"], w.get("bias"))

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if "weight" in need.params else {}

    def backward(self, g, kept, w, need):
        grads = {}
        x = kept.get("x")
        if len(self.out_shape) > 1:  # tokens (N, ..., D): every token is a row
            g2 = g.reshape(-1, self.out_shape[-1])
            x = x.reshape(-1, self.in_shapes[0][-1]) if x is not None else None
        else:
            g2 = g
        if "bias" in need.params:
            grads["bias"] = g2.sum(0)
        if "weight" in need.params:
            grads["weight"] = g2.t() @ x
        gx = g @ w["weight"] if need.inputs[0] else None
        return [gx], grads


# ---- which traced ops this rule runs -------------------------------------------------------------

from .registry import Call, Lowered, aten, handles  # noqa: E402


@handles(aten.linear.default)
def _linear(call: Call) -> Lowered:
    x, w, b = call.act(0), call.const(1), call.const(2, "bias")
    return Lowered(Linear(), [x], {"weight": w} | ({"bias": b} if b is not None else {}))
