"""Piecewise-linear activations. Without the mask modifier each keeps what torch autograd keeps (a
float tensor); with it, each keeps a boolean mask: exact for ReLU, ReLU6, Hardtanh / clamp, LeakyReLU,
PReLU (while its slope is frozen) and Hardsigmoid, an approximation for Hard-Swish (MobileTL's sign
rule)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lowering import pins, replaying
from .base import Rule


def _late_float(m, g):
    """The mask as g's dtype, made only once g exists (an always-false element from g): left
    free, onnxruntime casts it early and holds the float copy until g arrives."""
    return (m | (g.reshape(-1)[:1] > float("inf"))).to(g.dtype)


class _Activation(Rule):
    mask = False  # set by the `mask` recipe modifier
    # what the backward pops from `kept` and frees inside it, in the replay of onnxruntime's schedule (`Program`):
    # the bool mask only; a float keep lives to the end of the rule's backward
    drops_kept: tuple[str, ...] = ("m",)
    per_sample = True

    def keep(self, xs, y, w, need):
        if not need.inputs[0]:
            return {}
        return {"m": self._mask(xs[0], y)} if self.mask else self._float_keep(xs[0], y)

    def backward(self, g, kept, w, need):
        if "m" in kept:
            # onnxruntime (pinned schedule): the mask made float late; runtimes that run the step as
            # written get the bool mask itself, applied by `where` (no float copy of it)
            if pins(w) and replaying(w):
                # onnxruntime frees the bool mask once its float copy exists (its last read), before the
                # product: the replay drops it here (`drops_kept`; traced, MobileNetV2 224 b8 `bias+mask`:
                # the gradient, the float mask and the product at the peak, 116.7 MB, not the bool mask too)
                m = _late_float(kept.pop("m"), g)
            else:
                m = _late_float(kept["m"], g) if pins(w) else kept["m"]
            return [self._mask_backward(g, m)], {}
        if "d" in kept:
            return [g * kept["d"]], {}
        return [self._float_backward(g, kept)], {}

    def local_derivative(self, kept, dtype):
        if "m" in kept or self._float_local is None:
            return None  # a mask's float copy is pinned to the gradient (`_late_float`)
        return {"d": self._float_local(kept).to(dtype)}

    _float_local = None  # the kept float tensors -> the dy/dx (bool or float) its float backward multiplies g by

    def _float_backward(self, g, kept):
        """g times dy/dx from the kept float tensors (rules without a `_float_local` override this)."""
        return g * self._float_local(kept).to(g.dtype)

    def _mask_backward(self, g, m):
        """g where the mask holds, else 0; m is the bool mask or its float copy."""
        gm = torch.where(m, g, 0.0) if m.dtype == torch.bool else g * m
        return gm * self.mask_scale if self.mask_scale != 1.0 else gm

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

    def _float_local(self, kept):
        return kept["y"] > 0


class ReLU6(_Activation):
    kind = "relu6"

    def compute(self, xs, w):
        return F.relu6(xs[0])

    def _mask(self, x, y):
        return (y > 0) & (y < 6)

    def _float_keep(self, x, y):
        return {"y": y}

    def _float_local(self, kept):
        y = kept["y"]
        return (y > 0) & (y < 6)


class Hardsigmoid(_Activation):
    kind = "hardsigmoid"
    mask_scale = 1.0 / 6.0

    def compute(self, xs, w):
        return F.hardsigmoid(xs[0])

    def _mask(self, x, y):
        return (x > -3) & (x < 3)

    def _float_keep(self, x, y):
        return {"x": x}

    def _float_local(self, kept):
        x = kept["x"]
        return ((x > -3) & (x < 3)).to(x.dtype) * self.mask_scale


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

    def _float_local(self, kept):
        x = kept["x"]
        return (x / 3 + 0.5) * ((x > -3) & (x <= 3)).to(x.dtype) + (x > 3).to(x.dtype)


class Clamp(_Activation):
    """`aten.hardtanh` / `aten.clamp` to [lo, hi] (either may be None), other than ReLU's and
    ReLU6's. Passes g where the input lies strictly inside (hardtanh) or inside or on the bounds
    (clamp), as torch's backward of each does; keeps its input, or that as a mask."""

    kind = "clamp"

    def __init__(self, lo: float | None, hi: float | None, inclusive: bool = False):
        self.lo, self.hi, self.inclusive = lo, hi, inclusive

    def compute(self, xs, w):
        return torch.clamp(xs[0], self.lo, self.hi)

    def _mask(self, x, y):
        inside = None
        if self.lo is not None:
            inside = x >= self.lo if self.inclusive else x > self.lo
        if self.hi is not None:
            upper = x <= self.hi if self.inclusive else x < self.hi
            inside = upper if inside is None else inside & upper
        return inside

    def _float_keep(self, x, y):
        return {"x": x}

    def _float_local(self, kept):
        return self._mask(kept["x"], None)

    def describe(self) -> str:
        return f"clamp[{self.lo}, {self.hi}]{' (1-bit mask)' if self.mask else ''}"


class LeakyReLU(_Activation):
    """`aten.leaky_relu`: y = x for x > 0, else slope·x. dy/dx is 1 or the slope, so the mask
    (x > 0) is exact; without it, it keeps its input as autograd does."""

    kind = "leaky_relu"

    def __init__(self, slope: float = 0.01):
        self.slope = float(slope)

    def compute(self, xs, w):
        return F.leaky_relu(xs[0], self.slope)

    def _mask(self, x, y):
        return x > 0

    def _float_keep(self, x, y):
        return {"x": x}

    def _float_local(self, kept):
        return (kept["x"] > 0).to(kept["x"].dtype) * (1.0 - self.slope) + self.slope  # 1 where x > 0, else the slope

    def _mask_backward(self, g, m):
        if m.dtype == torch.bool:
            return torch.where(m, g, g * self.slope)
        return g * (m * (1.0 - self.slope) + self.slope)  # 1 where x > 0, else the slope

    def describe(self) -> str:
        return f"leaky_relu({self.slope}){' (1-bit mask)' if self.mask else ''}"


def _per_channel(a, x):
    """PReLU's slope (one per channel, or one for all) broadcast against x (N, C, ...)."""
    return a.reshape(1, -1, *[1] * (x.dim() - 2)) if a.numel() > 1 else a.reshape(())


class PReLU(_Activation):
    """`aten.prelu`: LeakyReLU with a learned slope a (role "weight": one per channel, or one).
    It trains under `full` (as every parameter) and stays frozen under `bias`. The input gradient
    needs only where x > 0 (a mask, exact); the slope's gradient, Σ g·x over x ≤ 0, needs x itself,
    so while the slope trains it keeps x (even under `mask`)."""

    kind = "prelu"
    drops_kept = ()  # its backward reads the mask to the end

    def compute(self, xs, w):
        x = xs[0]
        a = _per_channel(w["weight"], x)
        return torch.where(x > 0, x, x * a)

    def keep(self, xs, y, w, need):
        if "weight" in need.params:
            return {"x": xs[0]}
        return super().keep(xs, y, w, need)

    def _mask(self, x, y):
        return x > 0

    def _float_keep(self, x, y):
        return {"x": x}

    def backward(self, g, kept, w, need):
        if "m" in kept:
            m = _late_float(kept["m"], g) if pins(w) else kept["m"].to(g.dtype)
        else:
            m = (kept["x"] > 0).to(g.dtype)
        a = _per_channel(w["weight"], g)
        gx = g * (m + (1.0 - m) * a) if need.inputs[0] else None
        grads = {}
        if "weight" in need.params:
            neg = g * kept["x"] * (1.0 - m)
            dims = (0, *range(2, g.dim())) if w["weight"].numel() > 1 else tuple(range(g.dim()))
            grads["weight"] = neg.sum(dims).reshape(w["weight"].shape)
        return [gx], grads


ACTIVATIONS = {"relu": ReLU, "relu6": ReLU6, "hardswish": Hardswish, "hardsigmoid": Hardsigmoid,
               "leaky_relu": LeakyReLU, "prelu": PReLU, "clamp": Clamp}


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
    if lo is None and hi is None:
        raise Unsupported("clamp without bounds")
    if not all(isinstance(v, (int, float)) or v is None for v in (lo, hi)):
        raise Unsupported("clamp to tensor bounds")
    return Lowered(Clamp(lo, hi, inclusive=call.op is aten.clamp.default), [call.act(0)])


@handles(aten.leaky_relu.default)
def _leaky_relu(call: Call) -> Lowered:
    return Lowered(LeakyReLU(call.arg(1, "negative_slope", 0.01)), [call.act(0)])


@handles(aten.prelu.default, aten._prelu_kernel.default)
def _prelu(call: Call) -> Lowered:
    weight = call.const(1, "weight")
    if weight is None:
        raise Unsupported("a PReLU slope that is an activation")
    return Lowered(PReLU(), [call.act(0)], {"weight": weight})


@handles(aten.relu6.default)
def _relu6(call: Call) -> Lowered:
    return Lowered(ReLU6(), [call.act(0)])


@handles(aten.hardswish.default)
def _hardswish(call: Call) -> Lowered:
    return Lowered(Hardswish(), [call.act(0)])


@handles(aten.hardsigmoid.default)
def _hardsigmoid(call: Call) -> Lowered:
    return Lowered(Hardsigmoid(), [call.act(0)])
