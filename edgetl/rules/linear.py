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


# ---- which traced ops this rule runs -------------------------------------------------------------

from .registry import Call, Lowered, Unsupported, aten, handles  # noqa: E402


@handles(aten.linear.default)
def _linear(call: Call) -> Lowered:
    x, w, b = call.act(0), call.const(1), call.const(2, "bias")
    if len(x.shape) != 1:
        raise Unsupported(f"a linear layer on {len(x.shape)}-D samples (only flat feature vectors have a rule)")
    return Lowered(Linear(), [x], {"weight": w} | ({"bias": b} if b is not None else {}))
