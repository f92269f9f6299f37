"""Layers without weights of their own, and a standalone BatchNorm as a per-channel affine."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Rule, sum_to


class Identity(Rule):
    """Dropout (identity in the lean step, which is deterministic) and no-op reshapes."""

    kind = "identity"

    def compute(self, xs, w):
        return xs[0]

    def backward(self, g, kept, w, need):
        return [g], {}


class Flatten(Rule):
    kind = "flatten"

    def compute(self, xs, w):
        return xs[0].flatten(1)

    def backward(self, g, kept, w, need):
        return [g.reshape(-1, *self.in_shapes[0])], {}


class Add(Rule):
    kind = "add"

    def compute(self, xs, w):
        return xs[0] + xs[1]

    def backward(self, g, kept, w, need):
        return [sum_to(g, s) if n else None for s, n in zip(self.in_shapes, need.inputs)], {}


class Sub(Rule):
    kind = "sub"

    def compute(self, xs, w):
        return xs[0] - xs[1]

    def backward(self, g, kept, w, need):
        ga = sum_to(g, self.in_shapes[0]) if need.inputs[0] else None
        gb = -sum_to(g, self.in_shapes[1]) if need.inputs[1] else None
        return [ga, gb], {}


class Mul(Rule):
    """Elementwise product with broadcasting (squeeze-excite gating)."""

    kind = "mul"

    def compute(self, xs, w):
        return xs[0] * xs[1]

    def keep(self, xs, y, w, need):
        kept = {}
        if need.inputs[0]:
            kept["b"] = xs[1]
        if need.inputs[1]:
            kept["a"] = xs[0]
        return kept

    def backward(self, g, kept, w, need):
        ga = sum_to(g * kept["b"], self.in_shapes[0]) if need.inputs[0] else None
        gb = sum_to(g * kept["a"], self.in_shapes[1]) if need.inputs[1] else None
        return [ga, gb], {}


class Div(Rule):
    """Elementwise quotient a / b of two activations with broadcasting (a norm written out: x̂ = (x - u) / σ).
    Keeps b, and a when b needs a gradient, as autograd does: da = g / b, db = -g·a / b²."""

    kind = "div"

    def compute(self, xs, w):
        return xs[0] / xs[1]

    def keep(self, xs, y, w, need):
        kept = {"b": xs[1]} if any(need.inputs) else {}
        if need.inputs[1]:
            kept["a"] = xs[0]
        return kept

    def backward(self, g, kept, w, need):
        b = kept["b"]
        ga = sum_to(g / b, self.in_shapes[0]) if need.inputs[0] else None
        gb = sum_to(-g * kept["a"] / (b * b), self.in_shapes[1]) if need.inputs[1] else None
        return [ga, gb], {}


class Concat(Rule):
    """Concatenation along a per-sample dim (0: channels)."""

    kind = "concat"

    def __init__(self, dim: int = 0):
        self.dim = dim

    def compute(self, xs, w):
        return torch.cat(xs, self.dim + 1)

    def backward(self, g, kept, w, need):
        grads, start = [], 0
        for shape, needed in zip(self.in_shapes, need.inputs):
            grads.append(g.narrow(self.dim + 1, start, shape[self.dim]) if needed else None)
            start += shape[self.dim]
        return grads, {}


def _per_channel(t, ndim: int):
    return t.reshape(1, -1, *[1] * (ndim - 2))


class Affine(Rule):
    """A BatchNorm that follows no conv: y = x * weight + bias per channel (eval statistics)."""

    kind = "affine"

    def __init__(self, from_batchnorm: bool = False):
        self.from_batchnorm = from_batchnorm  # such a node is folded into a preceding conv when it can be

    def compute(self, xs, w):
        x = xs[0]
        return x * _per_channel(w["weight"], x.dim()) + _per_channel(w["bias"], x.dim())

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if "weight" in need.params else {}

    def backward(self, g, kept, w, need):
        grads = {}
        dims = (0, *range(2, g.dim()))
        if "bias" in need.params:
            grads["bias"] = g.sum(dims)
        if "weight" in need.params:
            grads["weight"] = (g * kept["x"]).sum(dims)
        gx = g * _per_channel(w["weight"], g.dim()) if need.inputs[0] else None
        return [gx], grads


class Pad(Rule):
    """Constant padding that could not be folded into a following conv."""

    kind = "pad"

    def __init__(self, pads: tuple[int, ...], value: float = 0.0):
        self.pads = tuple(pads)  # as F.pad takes them: (left, right) of the last dim, then the one before, ...
        self.value = value

    def compute(self, xs, w):
        return F.pad(xs[0], self.pads, value=self.value)

    def backward(self, g, kept, w, need):
        idx = [slice(None)] * g.dim()
        for i in range(len(self.pads) // 2):
            d = g.dim() - 1 - i
            idx[d] = slice(self.pads[2 * i], self.out_shape[d - 1] - self.pads[2 * i + 1])
        return [g[tuple(idx)].clone()], {}


class ConstOp(Rule):
    """An activation combined elementwise with a constant (a number or a frozen tensor of the
    model, broadcast): `x + c`, `x - c`, `c - x`, `x * c`, `x / c`."""

    kind = "const_op"

    def __init__(self, op: str, other, reverse: bool = False):
        self.op, self.other, self.reverse = op, other, reverse

    def _c(self, x):
        c = self.other
        return c.to(device=x.device, dtype=x.dtype) if isinstance(c, torch.Tensor) else c

    def compute(self, xs, w):
        x, c = xs[0], self._c(xs[0])
        if self.op == "add":
            return x + c
        if self.op == "sub":
            return c - x if self.reverse else x - c
        if self.op == "mul":
            return x * c
        return x / c

    def backward(self, g, kept, w, need):
        c = self._c(g)
        if self.op == "mul":
            g = g * c
        elif self.op == "div":
            g = g / c
        elif self.op == "sub" and self.reverse:
            g = -g
        return [sum_to(g, self.in_shapes[0])], {}

    def describe(self) -> str:
        c = self.other
        return f"{self.op} {'tensor' if isinstance(c, torch.Tensor) else c}"


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Act, Call, Const, Lowered, Unsupported, aten, handles  # noqa: E402

_IDENTITY = [aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
             aten.contiguous.default, aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default,
             aten.alpha_dropout.default, aten.feature_alpha_dropout.default]


@handles(*_IDENTITY)
def _identity(call: Call):
    """Copies, aliases and dropout (the lean step is deterministic, as eval is)."""
    x = call.arg(0)
    return (x, None) if call.op is aten.native_dropout.default else x


@handles(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default)
def _to_copy(call: Call):
    dtype = call.kwargs.get("dtype")
    if call.op in (aten.to.dtype, aten.to.device):
        dtype = next((a for a in call.args[1:] if isinstance(a, torch.dtype)), dtype)
    elif call.op is aten.type_as.default:
        dtype = None if isinstance(call.arg(1), Act) else call.arg(1).value.dtype
    if dtype not in (None, torch.float32):
        raise Unsupported(f"a cast to {dtype}")
    return call.arg(0)


@handles(aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default)
def _guard(call: Call):
    return None


_ARITH = {aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.div.Tensor: "div",
          aten.add.Scalar: "add", aten.sub.Scalar: "sub", aten.mul.Scalar: "mul", aten.div.Scalar: "div",
          aten.rsub.Scalar: "rsub", aten.rsub.Tensor: "rsub"}


@handles(*_ARITH)
def _arith(call: Call) -> Lowered:
    op = _ARITH[call.op]
    a, b = call.args[0], call.args[1]
    alpha = call.kwargs.get("alpha", call.args[2] if len(call.args) > 2 else 1)
    if call.kwargs.get("rounding_mode") is not None:
        raise Unsupported("division with rounding")
    if op == "rsub":
        op, a, b = "sub", b, a
    if alpha != 1:
        if op not in ("add", "sub") or isinstance(b, Act):
            raise Unsupported(f"{op} with alpha={alpha}")
        b = b * alpha if not isinstance(b, Const) else Const(b.value * alpha)
    if isinstance(a, Act) and isinstance(b, Act):
        rule = {"add": Add, "sub": Sub, "mul": Mul, "div": Div}[op]()
        return Lowered(rule, [a, b])
    act, other, reverse = (a, b, False) if isinstance(a, Act) else (b, a, True)
    if not isinstance(act, Act):
        raise Unsupported("no activation among the operands")
    if isinstance(other, Const):
        other = other.value.detach().clone()
        if other.dim() == len(act.shape) + 1:
            if other.shape[0] != 1:
                raise Unsupported("a constant that differs along the batch")
            other = other[0]
        other = other if other.numel() > 1 else float(other.reshape(()))
    if reverse and op == "div":
        raise Unsupported("division by an activation")
    return Lowered(ConstOp(op, other, reverse and op == "sub"), [act])


@handles(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
def _batch_norm(call: Call):
    x, weight, bias, mean, var = (call.arg(i) for i in range(5))
    if call.op is aten.batch_norm.default:
        if call.arg(5, "training"):
            _batch_norm_batch_stats(call)
        eps = call.arg(7, "eps", 1e-5)
    else:
        eps = call.arg(6, "eps", 1e-5)
    if not all(isinstance(v, Const) or v is None for v in (weight, bias, mean, var)) or mean is None:
        raise Unsupported("batch norm whose statistics are not constants")
    m, v = mean.value.float(), var.value.float()
    scale = (weight.value.float() if weight is not None else torch.ones_like(v)) / torch.sqrt(v + eps)
    shift = (bias.value.float() if bias is not None else torch.zeros_like(m)) - m * scale
    base = (weight or bias or mean).name.rsplit(".", 1)[0]
    params = {"weight": Const(scale, f"{base}.weight" if base else ""),
              "bias": Const(shift, f"{base}.bias" if base else "")}
    low = Lowered(Affine(from_batchnorm=True), [call.act(0)], params)
    return low if call.op is aten.batch_norm.default else (low, None, None)


@handles(aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats,
         aten.native_batch_norm.default, aten._native_batch_norm_legit_functional.default)
def _batch_norm_batch_stats(call: Call):
    raise Unsupported("batch norm with batch statistics (training mode or track_running_stats=False)")


@handles(aten.cat.default)
def _cat(call: Call) -> Lowered:
    xs = list(call.arg(0))
    if not all(isinstance(x, Act) for x in xs):
        raise Unsupported("concatenation with a constant")
    return Lowered(Concat(call.dim(call.arg(1, "dim", 0), len(xs[0].shape) + 1)), xs)


@handles(aten.constant_pad_nd.default, aten.pad.default)
def _pad(call: Call) -> Lowered:
    x, pads = call.act(0), tuple(call.arg(1))
    if call.op is aten.pad.default:
        mode = call.arg(2, "mode", "constant")
        if mode != "constant":
            raise Unsupported(f"{mode} padding (only constant padding has a rule)")
        value = call.arg(3, "value")
        return _pad_rule(x, pads, 0.0 if value is None else value)
    return _pad_rule(x, pads, call.arg(2, "value", 0.0))


def _pad_rule(x, pads, value) -> Lowered:
    if min(pads) < 0:
        raise Unsupported("negative padding (cropping)")
    if len(pads) // 2 > len(x.shape):
        raise Unsupported("padding of the batch dimension")
    return Lowered(Pad(pads, float(value)), [x])
