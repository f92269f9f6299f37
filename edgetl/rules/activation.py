"""Activations. Without the mask modifier each keeps what torch autograd keeps (a float tensor);
with it, each keeps a boolean mask: exact for ReLU, ReLU6 and Hardsigmoid, an approximation for
Hard-Swish (MobileTL's sign rule)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lowering import pins
from .base import Rule


class _Activation(Rule):
    mask = False  # set by the `mask` recipe modifier

    def keep(self, xs, y, w, need):
        if not need.inputs[0]:
            return {}
        return {"m": self._mask(xs[0], y)} if self.mask else self._float_keep(xs[0], y)

    def backward(self, g, kept, w, need):
        if "m" in kept:
            if pins(w):
                # the mask is made float only once g exists (an always-false element from g): left
                # free, onnxruntime casts it early and holds the float copy until g arrives
                gm = g * (kept["m"] | (g.reshape(-1)[:1] > float("inf"))).to(g.dtype)
            else:  # runtimes that run the step as written: no float copy of the mask
                gm = torch.where(kept["m"], g, 0.0)
            return [gm * self.mask_scale if self.mask_scale != 1.0 else gm], {}
        return [self._float_backward(g, kept)], {}

    mask_scale = 1.0

    def describe(self) -> str:
        return f"{self.kind}{' (1-bit mask)' if self.mask else ''}"


class ReLU(_Activation):
    kind = "relu"

    def compute(self, xs, w):
        return F.relu(xs[0])

    def _mask(self, x, y):
        return y > 0

    def _float_keep(self, x, y):
        return {"y": y}

    def _float_backward(self, g, kept):
        return g * (kept["y"] > 0).to(g.dtype)


class ReLU6(_Activation):
    kind = "relu6"

    def compute(self, xs, w):
        return F.relu6(xs[0])

    def _mask(self, x, y):
        return (y > 0) & (y < 6)

    def _float_keep(self, x, y):
        return {"y": y}

    def _float_backward(self, g, kept):
        y = kept["y"]
        return g * ((y > 0) & (y < 6)).to(g.dtype)


class Hardsigmoid(_Activation):
    kind = "hardsigmoid"
    mask_scale = 1.0 / 6.0

    def compute(self, xs, w):
        return F.hardsigmoid(xs[0])

    def _mask(self, x, y):
        return (x > -3) & (x < 3)

    def _float_keep(self, x, y):
        return {"x": x}

    def _float_backward(self, g, kept):
        x = kept["x"]
        return g * ((x > -3) & (x < 3)).to(g.dtype) * self.mask_scale


class _HardswishSignGrad(torch.autograd.Function):
    """Reference for the approximate rule: Hard-Swish forward, step-function backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x > 0)
        return F.hardswish(x)

    @staticmethod
    def backward(ctx, g):
        (m,) = ctx.saved_tensors
        return g * m.to(g.dtype)


class Hardswish(_Activation):
    """With the mask modifier the derivative (2x+3)/6 on (-3, 3) is replaced by the step 1[x > 0]
    (MobileTL). The step at 0 is where the true derivative crosses 1/2, the best 0/1 fit; the
    result is an approximation and is tested against `_HardswishSignGrad`, not against autograd."""

    kind = "hardswish"

    @property
    def approximate(self) -> bool:
        return self.mask

    def compute(self, xs, w):
        return F.hardswish(xs[0])

    def reference(self, xs, w):
        return _HardswishSignGrad.apply(xs[0]) if self.mask else F.hardswish(xs[0])

    def _mask(self, x, y):
        return x > 0

    def _float_keep(self, x, y):
        return {"x": x}

    def _float_backward(self, g, kept):
        x = kept["x"]
        mid = ((x > -3) & (x <= 3)).to(g.dtype)
        return g * (x / 3 + 0.5) * mid + g * (x > 3).to(g.dtype)


ACTIVATIONS = {"relu": ReLU, "relu6": ReLU6, "hardswish": Hardswish, "hardsigmoid": Hardsigmoid}


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Call, Lowered, Unsupported, aten, handles  # noqa: E402


@handles(aten.relu.default)
def _relu(call: Call) -> Lowered:
    return Lowered(ReLU(), [call.act(0)])


@handles(aten.hardtanh.default, aten.clamp.default)
def _clamp(call: Call) -> Lowered:
    if call.op is aten.hardtanh.default:
        lo, hi = call.arg(1, "min_val", -1.0), call.arg(2, "max_val", 1.0)
    else:
        lo, hi = call.arg(1, "min"), call.arg(2, "max")
    if lo == 0 and hi == 6:
        return Lowered(ReLU6(), [call.act(0)])
    if lo == 0 and hi is None:
        return Lowered(ReLU(), [call.act(0)])
    raise Unsupported(f"clamp to [{lo}, {hi}] (only ReLU's [0, inf) and ReLU6's [0, 6] have rules)")


@handles(aten.relu6.default)
def _relu6(call: Call) -> Lowered:
    return Lowered(ReLU6(), [call.act(0)])


@handles(aten.hardswish.default)
def _hardswish(call: Call) -> Lowered:
    return Lowered(Hardswish(), [call.act(0)])


@handles(aten.hardsigmoid.default)
def _hardsigmoid(call: Call) -> Lowered:
    return Lowered(Hardsigmoid(), [call.act(0)])
