"""Attention: Softmax, the product of two activations (q @ kᵀ, p @ v) and fused
scaled_dot_product_attention.

Softmax keeps its output (the probabilities), as autograd does. A matmul of two activations keeps
each operand the other's gradient needs. The fused attention keeps q, k, v and the attention
probabilities p = softmax(q kᵀ · scale), (the heads × N × N tensor that dominates a transformer's
memory), so its backward recomputes nothing. With `q8`/`q4` (Mesa, S2A), Softmax and attention keep
p as 8/4-bit codes per channel (per head for attention): an approximation, measured against exact
autograd in tests/test_rules_attn.py."""
from __future__ import annotations

import torch

from .base import Rule, Tensor, sum_to
from .kept_quant import dequantize, quantize
from .lean_reference import lean_backward


def _softmax_grad(g: Tensor, p: Tensor, dim: int) -> Tensor:
    return p * (g - (g * p).sum(dim, keepdim=True))


class _KeepsProbabilities(Rule):
    quant_bits: int | None = None  # set by the q8 / q4 recipe modifiers

    @property
    def approximate(self) -> bool:
        return self.quant_bits is not None

    def _keep_p(self, p: Tensor) -> dict[str, Tensor]:
        if not self.quant_bits:
            return {"p": p}
        return {f"p_{k}": v for k, v in quantize(p, self.quant_bits).items()}

    def _p(self, kept: dict[str, Tensor], shape: tuple[int, ...], dtype) -> Tensor:
        if not self.quant_bits:
            return kept["p"]
        return dequantize({k[2:]: v for k, v in kept.items() if k.startswith("p_")}, shape, self.quant_bits, dtype)

    def describe(self) -> str:
        return f"{self.kind}{f' ({self.quant_bits}-bit kept)' if self.quant_bits else ''}"


class Softmax(_KeepsProbabilities):
    """softmax over one per-sample dim."""

    kind = "softmax"

    def __init__(self, dim: int):
        self.dim = dim

    def compute(self, xs, w):
        return torch.softmax(xs[0], self.dim + 1)

    def reference(self, xs, w):
        return lean_backward(self, xs, w) if self.quant_bits else self.compute(xs, w)

    def keep(self, xs, y, w, need):
        return self._keep_p(y) if need.inputs[0] else {}

    def backward(self, g, kept, w, need):
        return [_softmax_grad(g, self._p(kept, self.out_shape, g.dtype), self.dim + 1)], {}


class MatMul(Rule):
    """a @ b of two activations with the same leading (batch-like) dims, or b broadcast over them."""

    kind = "matmul"

    def compute(self, xs, w):
        return torch.matmul(xs[0], xs[1])

    def keep(self, xs, y, w, need):
        kept = {}
        if need.inputs[0]:
            kept["b"] = xs[1]
        if need.inputs[1]:
            kept["a"] = xs[0]
        return kept

    def backward(self, g, kept, w, need):
        ga = sum_to(g @ kept["b"].transpose(-1, -2), self.in_shapes[0]) if need.inputs[0] else None
        gb = sum_to(kept["a"].transpose(-1, -2) @ g, self.in_shapes[1]) if need.inputs[1] else None
        return [ga, gb], {}


class Attention(_KeepsProbabilities):
    """scaled_dot_product_attention(q, k, v) without mask or dropout (optionally causal):
    y = softmax(q kᵀ · scale) v, computed in that explicit form (it exports to every runtime)."""

    kind = "attention"

    def __init__(self, scale: float | None = None, causal: bool = False):
        self.scale, self.causal = scale, causal

    def _scale(self) -> float:
        return self.scale if self.scale is not None else self.in_shapes[0][-1] ** -0.5

    def _probabilities(self, q: Tensor, k: Tensor) -> Tensor:
        s = torch.matmul(q, k.transpose(-1, -2)) * self._scale()
        if self.causal:
            n, m = s.shape[-2], s.shape[-1]
            allowed = torch.ones(n, m, dtype=torch.bool).tril()
            s = s.masked_fill(~allowed.to(s.device), float("-inf"))
        return torch.softmax(s, -1)

    def compute(self, xs, w):
        q, k, v = xs
        return torch.matmul(self._probabilities(q, k), v)

    def reference(self, xs, w):
        if self.quant_bits:
            return lean_backward(self, xs, w)
        q, k, v = xs
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self._scale(), is_causal=self.causal)

    def forward(self, xs, w, need):
        q, k, v = xs
        p = self._probabilities(q, k)
        y = torch.matmul(p, v)
        if not need.any:
            return y, {}
        kept = self._keep_p(p)
        if need.inputs[0]:
            kept["k"] = k
        if need.inputs[1]:
            kept["q"] = q
        if need.inputs[0] or need.inputs[1]:
            kept["v"] = v
        return y, kept

    def backward(self, g, kept, w, need):
        nk = self.in_shapes[1][-2]
        p = self._p(kept, (*self.in_shapes[0][:-1], nk), g.dtype)
        gv = p.transpose(-1, -2) @ g if need.inputs[2] else None
        gq = gk = None
        if need.inputs[0] or need.inputs[1]:
            gs = _softmax_grad(g @ kept["v"].transpose(-1, -2), p, -1) * self._scale()
            if need.inputs[0]:
                gq = gs @ kept["k"]
            if need.inputs[1]:
                gk = gs.transpose(-1, -2) @ kept["q"]
        return [gq, gk, gv], {}

    def describe(self) -> str:
        return ("causal " if self.causal else "") + super().describe()


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Act, Call, Lowered, Unsupported, aten, handles  # noqa: E402
from .shape import Select  # noqa: E402


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(call: Call) -> Lowered:
    x = call.act(0)
    if call.op is aten.softmax.int and call.arg(2, "dtype") not in (None, torch.float32):
        raise Unsupported("a softmax in another dtype")
    if call.op is aten._softmax.default and call.arg(2, "half_to_float"):
        raise Unsupported("a softmax from half to float")
    return Lowered(Softmax(call.dim(call.arg(1, "dim"), len(x.shape) + 1)), [x])


@handles(aten.matmul.default, aten.bmm.default)
def _matmul(call: Call) -> Lowered:
    a, b = call.arg(0), call.arg(1)
    if not (isinstance(a, Act) and isinstance(b, Act)):
        raise Unsupported("a matmul with a parameter (a linear layer written as x @ W has no rule yet)")
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise Unsupported("a matmul of per-sample vectors")
    return Lowered(MatMul(), [a, b])


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(call: Call) -> Lowered:
    q, k, v = call.act(0), call.act(1), call.act(2)
    if call.arg(3, "attn_mask") is not None:
        raise Unsupported("attention with a mask (only unmasked or causal attention has a rule)")
    if call.arg(4, "dropout_p", 0.0):
        raise Unsupported("attention with dropout")
    if call.kwargs.get("enable_gqa", False):
        raise Unsupported("grouped-query attention")
    if k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise Unsupported("attention whose q, k, v shapes differ (cross or grouped attention)")
    return Lowered(Attention(call.arg(6, "scale"), bool(call.arg(5, "is_causal", False))), [q, k, v])


@handles(aten.unbind.int)
def _unbind(call: Call) -> list:
    x = call.act(0)
    dim = call.dim(call.arg(1, "dim", 0), len(x.shape) + 1)
    return [Lowered(Select(dim, i), [x]) for i in range(x.shape[dim])]
