"""Normalization layers that normalize each sample with its own statistics: LayerNorm (over the
last dims, incl. ConvNeXt's channels-last), GroupNorm and RMSNorm. Each keeps the normalized input
x̂ (the size of x) and one reciprocal standard deviation per normalized group, what the input
gradient needs; the scale's gradient needs x̂ too, the shift's nothing. With `q8`/`q4`, x̂ is kept as
8/4-bit codes (per channel, see kept_quant.py): an approximation (the statistics stay fp32)."""
from __future__ import annotations

import math

import torch

from .base import Rule, Tensor
from .kept_quant import dequantize, quantize
from .lean_reference import lean_backward


class _Norm(Rule):
    quant_bits: int | None = None  # set by the q8 / q4 recipe modifiers
    eps = 1e-5

    @property
    def approximate(self) -> bool:
        return self.quant_bits is not None

    def reference(self, xs, w):
        return lean_backward(self, xs, w) if self.quant_bits else self._torch(xs[0], w)

    # subclasses: _groups(x) -> x viewed as (N, G, M) with each group's M values normalized together;
    # _affine(xhat, w) applies scale and shift; _scale_grad / _shift_grad reduce to the parameters.
    centered = True

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xg = self._groups(x)
        if self.centered:
            mean = xg.mean(-1, keepdim=True)
            xc = xg - mean
        else:
            xc = xg
        rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + self.eps)
        return (xc * rstd).reshape(x.shape), rstd

    def compute(self, xs, w):
        xhat, _ = self._stats(xs[0])
        return self._affine(xhat, w)

    def forward(self, xs, w, need):
        xhat, rstd = self._stats(xs[0])
        y = self._affine(xhat, w)
        kept = {}
        if need.inputs[0] or "weight" in need.params:
            if self.quant_bits:
                kept.update({f"xhat_{k}": v for k, v in quantize(xhat, self.quant_bits).items()})
            else:
                kept["xhat"] = xhat
        if need.inputs[0]:
            kept["rstd"] = rstd
        return y, kept

    def _xhat(self, kept, dtype) -> Tensor:
        if not self.quant_bits:
            return kept["xhat"]
        q = {k[5:]: v for k, v in kept.items() if k.startswith("xhat_")}
        return dequantize(q, tuple(self.in_shapes[0]), self.quant_bits, dtype)

    def backward(self, g, kept, w, need):
        grads = {}
        xhat = self._xhat(kept, g.dtype) if "xhat" in kept or "xhat_q" in kept else None
        if "bias" in need.params:
            grads["bias"] = self._reduce(g)
        if "weight" in need.params:
            grads["weight"] = self._reduce(g * xhat)
        if not need.inputs[0]:
            return [None], grads
        gh = self._groups(self._scale_input_grad(g, w))
        xh = self._groups(xhat)
        inner = (gh * xh).mean(-1, keepdim=True)
        gx = gh - xh * inner
        if self.centered:
            gx = gx - gh.mean(-1, keepdim=True)
        return [(gx * kept["rstd"]).reshape(g.shape)], grads

    def describe(self) -> str:
        return f"{self.kind}{f' ({self.quant_bits}-bit kept)' if self.quant_bits else ''}"


class LayerNorm(_Norm):
    """`aten.layer_norm` (and RMSNorm with `centered=False`): normalized over the last
    len(shape) dims; weight and bias have that shape."""

    kind = "layernorm"

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-5, centered: bool = True):
        self.shape, self.eps, self.centered = tuple(shape), eps, centered
        if not centered:
            self.kind = "rmsnorm"

    def _torch(self, x, w):
        if self.centered:
            return torch.nn.functional.layer_norm(x, self.shape, w.get("weight"), w.get("bias"), self.eps)
        return torch.nn.functional.rms_norm(x, self.shape, w.get("weight"), self.eps)

    def _groups(self, x):
        return x.reshape(-1, math.prod(self.shape))

    def _affine(self, xhat, w):
        y = xhat * w["weight"] if "weight" in w else xhat
        return y + w["bias"] if "bias" in w else y

    def _scale_input_grad(self, g, w):
        return g * w["weight"] if "weight" in w else g

    def _reduce(self, t):
        return t.reshape(-1, *self.shape).sum(0)


class GroupNorm(_Norm):
    """`aten.group_norm` on (C, ...) samples: `groups` groups of channels; per-channel affine."""

    kind = "groupnorm"

    def __init__(self, groups: int, eps: float = 1e-5):
        self.groups, self.eps = groups, eps

    def _torch(self, x, w):
        return torch.nn.functional.group_norm(x, self.groups, w.get("weight"), w.get("bias"), self.eps)

    def _groups(self, x):
        return x.reshape(x.shape[0], self.groups, -1)

    def _channel(self, t, ndim):
        return t.reshape(1, -1, *[1] * (ndim - 2))

    def _affine(self, xhat, w):
        y = xhat * self._channel(w["weight"], xhat.dim()) if "weight" in w else xhat
        return y + self._channel(w["bias"], xhat.dim()) if "bias" in w else y

    def _scale_input_grad(self, g, w):
        return g * self._channel(w["weight"], g.dim()) if "weight" in w else g

    def _reduce(self, t):
        return t.sum((0, *range(2, t.dim())))


NORMS = (LayerNorm, GroupNorm)


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Call, Lowered, Unsupported, aten, handles  # noqa: E402


def _params(weight, bias) -> dict:
    return ({"weight": weight} if weight is not None else {}) | ({"bias": bias} if bias is not None else {})


@handles(aten.layer_norm.default, aten.native_layer_norm.default)
def _layer_norm(call: Call):
    x = call.act(0)
    shape = tuple(call.arg(1))
    weight, bias = call.const(2, "weight"), call.const(3, "bias")
    eps = call.arg(4, "eps", 1e-5)
    if len(shape) >= len(x.shape) + 1 or tuple(x.shape[len(x.shape) - len(shape):]) != shape:
        raise Unsupported("a layer norm over the batch dimension")
    low = Lowered(LayerNorm(shape, eps), [x], _params(weight, bias))
    return low if call.op is aten.layer_norm.default else (low, None, None)


@handles(aten.rms_norm.default)
def _rms_norm(call: Call):
    x = call.act(0)
    shape = tuple(call.arg(1))
    weight = call.const(2, "weight")
    eps = call.arg(3, "eps")
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    if len(shape) >= len(x.shape) + 1:
        raise Unsupported("an RMS norm over the batch dimension")
    return Lowered(LayerNorm(shape, eps, centered=False), [x], _params(weight, None))


@handles(aten.group_norm.default)
def _group_norm(call: Call):
    x = call.act(0)
    groups = call.arg(1, "num_groups")
    weight, bias = call.const(2, "weight"), call.const(3, "bias")
    eps = call.arg(4, "eps", 1e-5)
    return Lowered(GroupNorm(groups, eps), [x], _params(weight, bias))


@handles(aten.native_group_norm.default)
def _native_group_norm(call: Call):
    x = call.act(0)
    weight, bias = call.const(1, "weight"), call.const(2, "bias")
    groups, eps = call.arg(6), call.arg(7)
    return Lowered(GroupNorm(groups, eps), [x], _params(weight, bias)), None, None


