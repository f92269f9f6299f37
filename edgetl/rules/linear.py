"""Linear (fully connected) layer, on feature vectors or on the last dim of tokens (..., D)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lowering import by_rows, in_blocks, int8_of, lowering_of, separate_bias, summed_by_rows
from ..quant import int8_weight_linear, int8_weight_linear_input_grad
from .base import Rule


class Linear(Rule):
    kind = "linear"
    quantizable = True

    def by_rows(self, role):
        return role == "weight"

    @staticmethod
    def _int8_weight(w):
        """The stored (int8, scale) where the program reads the weight so (`Lowering.int8_frozen_linear`; never a
        weight by row blocks), else None."""
        return int8_of(w, "weight")

    def compute(self, xs, w):
        x = xs[0]
        if (stored := self._int8_weight(w)) is not None:
            y = int8_weight_linear(x, *stored)
            return y + w["bias"] if "bias" in w else y
        if in_blocks(w, "weight"):  # output features by blocks of rows
            y = torch.cat(by_rows(w, "weight", lambda lo, hi, wr: F.linear(x, wr)), -1)
            return y + w["bias"] if "bias" in w else y
        if "bias" in w and separate_bias(w):
            return F.linear(x, w["weight"]) + w["bias"]
        return F.linear(x, w["weight"], w.get("bias"))

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
        gx = None
        if need.inputs[0]:
            gx = self._input_grad(g, w)
        return [gx], grads

    def _input_grad(self, g, w):
        """g @ W: from the stored int8 where the program reads it so, by the weight's row blocks where it comes so,
        a frozen weight as its own transposed constant where the lowering asks
        (`Lowering.linear_input_grad_own_weight`)."""
        if (stored := self._int8_weight(w)) is not None:
            return int8_weight_linear_input_grad(g, *stored)
        out = g.shape[-1]
        by_transposed = lowering_of(w).linear_input_grad_own_weight and not w.trainable("weight")

        def part(lo: int, hi: int, wr: torch.Tensor) -> torch.Tensor:
            gr = g if hi - lo == out else g[..., lo:hi]
            return F.linear(gr, wr.t()) if by_transposed else gr @ wr

        return summed_by_rows(w, "weight", part)


# ---- which traced ops this rule runs -------------------------------------------------------------

from .registry import Call, Lowered, aten, handles  # noqa: E402


@handles(aten.linear.default)
def _linear(call: Call) -> Lowered:
    x, w, b = call.act(0), call.const(1), call.const(2, "bias")
    return Lowered(Linear(), [x], {"weight": w} | ({"bias": b} if b is not None else {}))
