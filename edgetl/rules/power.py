"""Powers and roots of an activation written out in `forward`: a norm computed by hand, as the official
ConvNeXt's channels-first LayerNorm (`(x - u).pow(2).mean(1)`, `torch.sqrt(s + eps)`, a division) or an
RMSNorm as `x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)`. Each keeps what autograd keeps."""
from __future__ import annotations

import torch

from .base import Rule


class Pow(Rule):
    """`aten.pow.Tensor_Scalar` (and `aten.square`): y = x^p for a number p. Keeps x; dy/dx = p·x^(p-1)."""

    kind = "pow"

    def __init__(self, exponent: float):
        self.exponent = float(exponent)

    def compute(self, xs, w):
        return torch.pow(xs[0], self.exponent)

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if self.exponent != 1.0 else {}

    def backward(self, g, kept, w, need):
        p = self.exponent
        if p == 1.0:
            return [g], {}
        x = kept["x"]
        local = 2.0 * x if p == 2.0 else p * torch.pow(x, p - 1.0)
        return [g * local], {}

    def describe(self) -> str:
        return f"pow {self.exponent:g}"


class Sqrt(Rule):
    """`aten.sqrt`: y = √x. Keeps y; dy/dx = 1 / (2y)."""

    kind = "sqrt"

    def compute(self, xs, w):
        return torch.sqrt(xs[0])

    def keep(self, xs, y, w, need):
        return {"y": y}

    def backward(self, g, kept, w, need):
        return [g / (2.0 * kept["y"])], {}


class Rsqrt(Rule):
    """`aten.rsqrt`: y = 1/√x. Keeps y; dy/dx = -y³/2."""

    kind = "rsqrt"

    def compute(self, xs, w):
        return torch.rsqrt(xs[0])

    def keep(self, xs, y, w, need):
        return {"y": y}

    def backward(self, g, kept, w, need):
        y = kept["y"]
        return [g * (-0.5 * y * y * y)], {}


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Call, Lowered, Unsupported, aten, handles  # noqa: E402


@handles(aten.pow.Tensor_Scalar, aten.square.default)
def _pow(call: Call) -> Lowered:
    exponent = 2.0 if call.op is aten.square.default else call.arg(1, "exponent")
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise Unsupported("a power whose exponent is not a number")
    return Lowered(Pow(exponent), [call.act(0)])


@handles(aten.sqrt.default)
def _sqrt(call: Call) -> Lowered:
    return Lowered(Sqrt(), [call.act(0)])


@handles(aten.rsqrt.default)
def _rsqrt(call: Call) -> Lowered:
    return Lowered(Rsqrt(), [call.act(0)])
