"""LoRA on a frozen Linear or 1×1 Conv2d: y = W·x + b + scale·B·(A·x), W frozen (int8 when
stored so), A (r, in) and B (out, r) trainable, scale = alpha / r.

What the backward keeps: only the input x of the branch's A (for a strided 1×1 conv, the strided
samples of x it reads). A·x is recomputed from it in the backward (r·in multiply-adds per
position) rather than kept: keeping it too would add r/in of x's bytes for nothing, as the
gradient of A needs x itself. The frozen weight's gradient is never formed; the input gradient
goes through W and the branch separately, so W stays a frozen operand (int8 dequantized where
used, a program constant for ExecuTorch's delegates, read as stored where the lowering asks:
`Lowering.int8_frozen_linear`)."""
from __future__ import annotations

import torch.nn.functional as F

from ..quant import int8_weight_linear
from .base import Rule, Tensor
from .conv import Conv2d, bias_grad
from .linear import Linear

LORA_ROLES = ("lora_a", "lora_b")


def _needs_x(need) -> bool:
    return bool(need.params & {"lora_a", "lora_b", "weight"})


class LoraLinear(Linear):
    kind = "linear+lora"

    def __init__(self, rank: int, scale: float):
        self.rank, self.scale = rank, float(scale)

    @classmethod
    def around(cls, base: Linear, rank: int, scale: float) -> "LoraLinear":
        new = cls(rank, scale)
        new.__dict__.update({k: v for k, v in base.__dict__.items() if k != "_bound"})
        return new

    def by_rows(self, role):
        return False  # the weight is read whole (its branch shares the op)

    def compute(self, xs, w):
        x = xs[0]
        stored = self._int8_weight(w)
        y = int8_weight_linear(x, *stored) if stored is not None else F.linear(x, w["weight"])
        y = y + F.linear(F.linear(x, w["lora_a"]), w["lora_b"]) * self.scale
        return y + w["bias"] if "bias" in w else y  # the bias as an add: a frozen op with no trainable operand

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if _needs_x(need) else {}

    def backward(self, g, kept, w, need):
        grads: dict[str, Tensor] = {}
        out = g.shape[-1]
        g2 = g.reshape(-1, out)  # any leading (token) dims as rows
        if "bias" in need.params:
            grads["bias"] = g2.sum(0)
        a, b = w["lora_a"], w["lora_b"]
        gb = g2 @ b  # (rows, r): the gradient reaching A·x
        if _needs_x(need):
            x2 = kept["x"].reshape(-1, a.shape[1])
            if "lora_b" in need.params:
                grads["lora_b"] = (g2.t() @ F.linear(x2, a)) * self.scale
            if "lora_a" in need.params:
                grads["lora_a"] = (gb.t() @ x2) * self.scale
            if "weight" in need.params:
                grads["weight"] = g2.t() @ x2
        gx = None
        if need.inputs[0]:
            gx = self._input_grad(g, w) + (gb @ a).reshape(*g.shape[:-1], a.shape[1]) * self.scale
        return [gx], grads

    def describe(self) -> str:
        return f"linear+lora{self.rank}"


class LoraConv2d(Conv2d):
    """A 1×1, ungrouped, unpadded Conv2d (any stride) with a LoRA branch: A (r, Cin, 1, 1) with the
    conv's stride, B (Cout, r, 1, 1)."""

    kind = "conv2d+lora"
    # its compute and backward read W as fp32 (a conv XNNPACK delegates only with a constant weight), never as int8
    int8_as_linear = False

    def __init__(self, rank: int, scale: float):
        self.rank, self.scale = rank, float(scale)

    @staticmethod
    def fits(rule: Rule) -> bool:
        return (type(rule) is Conv2d and rule.kernel == (1, 1) and rule.groups == 1
                and all(p == 0 for p in rule.pads))

    @classmethod
    def around(cls, base: Conv2d, rank: int, scale: float) -> "LoraConv2d":
        new = cls(rank, scale)
        new.__dict__.update({k: v for k, v in base.__dict__.items() if k != "_bound"})
        return new

    def _strided(self, x: Tensor) -> Tensor:
        sh, sw = self.stride
        return x if (sh, sw) == (1, 1) else x[:, :, ::sh, ::sw]

    def by_rows(self, role):
        return False

    def compute(self, xs, w):
        x = xs[0]
        y = F.conv2d(x, w["weight"], None, self.stride)
        y = y + F.conv2d(F.conv2d(x, w["lora_a"], None, self.stride), w["lora_b"]) * self.scale
        return y + w["bias"].reshape(1, -1, 1, 1) if "bias" in w else y

    def keep(self, xs, y, w, need):
        return {"x": self._strided(xs[0])} if _needs_x(need) else {}

    def backward(self, g, kept, w, need):
        grads: dict[str, Tensor] = {}
        cin = self.in_chw[0]
        cout, ho, wo = self.out_chw
        p = ho * wo
        a, b = w["lora_a"], w["lora_b"]
        r = a.shape[0]
        if "bias" in need.params:
            grads["bias"] = bias_grad(g, self.out_chw, w)
        # the gradient reaching A·x: B^T applied per position, (N, r, Ho, Wo)
        gb = F.conv2d(g, b.reshape(cout, r).t().reshape(r, cout, 1, 1))
        if _needs_x(need):
            xm = kept["x"].reshape(-1, cin, p)
            gm = g.reshape(-1, cout, p)
            if "lora_b" in need.params:
                ax = F.conv2d(kept["x"], a).reshape(-1, r, p)
                grads["lora_b"] = ((gm @ ax.transpose(1, 2)).sum(0) * self.scale).reshape(cout, r, 1, 1)
            if "lora_a" in need.params:
                ga = (xm @ gb.reshape(-1, r, p).transpose(1, 2)).sum(0)  # (Cin, r)
                grads["lora_a"] = (ga.t() * self.scale).reshape(r, cin, 1, 1)
            if "weight" in need.params:
                grads["weight"] = (gm @ xm.transpose(1, 2)).sum(0).reshape(cout, cin, 1, 1)
        gx = None
        if need.inputs[0]:
            gx = self._input_grad(g, w["weight"]) + self._input_grad(gb, a) * self.scale
        return [gx], grads

    def describe(self) -> str:
        return f"conv1x1/s{self.stride[0]}+lora{self.rank}"
