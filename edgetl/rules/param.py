"""Parameters a model uses directly in `forward`, not through a layer: a position embedding added to
the tokens (`x + pos_embed`), a layer-scale gamma (`x * gamma`), a class token concatenated before
the tokens (`cat((cls_token.expand(B, -1, -1), x), 1)`). Each becomes a node that holds the
parameter (role "param", in the model's own shape), so it trains when the recipe says so (`full`)
and is a frozen constant otherwise. A value gathered from a parameter by a constant index and then
only rearranged (a relative position bias `table[index].view(N, N, H).permute(2, 0, 1)` as Swin,
LeViT, EfficientFormer and EfficientViT write it) is added or multiplied by ParamTableAdd /
ParamTableMul: the tracer records where each element comes from in the table (`Const.pos`), the
forward gathers it and the backward scatter-adds the gradient into the table, keeping nothing but
the constant positions. Like every direct parameter it trains under `full` only (`bias` and `norm`
leave it frozen: it is neither a bias of a layer nor a norm shift). Values computed from parameters
with arithmetic stay frozen constants (ConstOp).

The builders here take over `add`, `mul` and `cat` when a direct parameter is among the operands
and hand every other call to the builders registered before them (structural.py)."""
from __future__ import annotations

import torch

from .base import Rule, Tensor
from .registry import BATCH, Act, Call, Const, Lowered, Unsupported, aten, builder_for, handles


def _reduce_to(g: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum a gradient (with the batch) to a parameter's full `shape` (broadcast from the right)."""
    extra = g.dim() - len(shape)
    if extra > 0:
        g = g.sum(tuple(range(extra)))
    elif extra < 0:
        g = g.reshape(*[1] * -extra, *g.shape)
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(dims, keepdim=True) if dims else g


class ParamAdd(Rule):
    """x + p (p broadcast): a position embedding."""

    kind = "param_add"

    def compute(self, xs, w):
        return xs[0] + w["param"]

    def backward(self, g, kept, w, need):
        grads = {"param": _reduce_to(g, tuple(w["param"].shape))} if "param" in need.params else {}
        return [g if need.inputs[0] else None], grads


class ParamMul(Rule):
    """x * p (p broadcast): a layer scale. Keeps x when p trains."""

    kind = "param_mul"

    def compute(self, xs, w):
        return xs[0] * w["param"]

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if "param" in need.params else {}

    def backward(self, g, kept, w, need):
        grads = {"param": _reduce_to(g * kept["x"], tuple(w["param"].shape))} if "param" in need.params else {}
        return [g * w["param"] if need.inputs[0] else None], grads


class ParamConcat(Rule):
    """cat of a parameter, the same for every sample, and x along a per-sample dim: a class token
    (p of shape (1, 1, D), tokens (N, D)). `first`: the parameter comes before x."""

    kind = "param_concat"

    def __init__(self, dim: int, first: bool = True):
        self.dim, self.first = dim, first

    def compute(self, xs, w):
        x, p = xs[0], w["param"]
        p = p.reshape(1, *p.shape[-(x.dim() - 1):]).expand(x.shape[0], *p.shape[-(x.dim() - 1):])
        return torch.cat((p, x) if self.first else (x, p), self.dim + 1)

    def backward(self, g, kept, w, need):
        n = self.in_shapes[0][self.dim]
        size = g.shape[self.dim + 1]
        gp_len = size - n
        gx = g.narrow(self.dim + 1, gp_len if self.first else 0, n) if need.inputs[0] else None
        grads = {}
        if "param" in need.params:
            gp = g.narrow(self.dim + 1, 0 if self.first else n, gp_len).sum(0)
            grads["param"] = gp.reshape(w["param"].shape)
        return [gx], grads


def _gather(table: Tensor, pos: Tensor) -> Tensor:
    return table.reshape(-1)[pos.to(table.device)]


def _scatter(g: Tensor, table: Tensor, pos: Tensor) -> Tensor:
    """The table's gradient: each element of `g` (reduced to pos's shape) added at its position."""
    g = _reduce_to(g, tuple(pos.shape)).reshape(-1)
    flat = torch.zeros(table.numel(), dtype=g.dtype, device=g.device)
    return flat.scatter_add(0, pos.reshape(-1).to(g.device), g).reshape(table.shape)


class ParamTableAdd(ParamAdd):
    """x + table.flatten()[pos] (broadcast): a relative position bias gathered from its table by a
    constant index. Keeps nothing; the table's gradient is a scatter-add."""

    kind = "param_table_add"

    def __init__(self, pos: Tensor):
        self.pos = pos

    def compute(self, xs, w):
        return xs[0] + _gather(w["param"], self.pos)

    def backward(self, g, kept, w, need):
        grads = {"param": _scatter(g, w["param"], self.pos)} if "param" in need.params else {}
        return [g if need.inputs[0] else None], grads


class ParamTableMul(ParamMul):
    """x * table.flatten()[pos] (broadcast): a scale gathered from a table. Keeps x when it trains."""

    kind = "param_table_mul"

    def __init__(self, pos: Tensor):
        self.pos = pos

    def compute(self, xs, w):
        return xs[0] * _gather(w["param"], self.pos)

    def backward(self, g, kept, w, need):
        grads = {"param": _scatter(g * kept["x"], w["param"], self.pos)} if "param" in need.params else {}
        return [g * _gather(w["param"], self.pos) if need.inputs[0] else None], grads


# ---- which traced ops these rules run ------------------------------------------------------------

_BEFORE = {op: builder_for(op) for op in (aten.add.Tensor, aten.mul.Tensor, aten.cat.default)}


def _per_sample(c: Const) -> Tensor | None:
    """A parameter expanded over the batch (cls_token.expand(B, -1, -1)) as one sample's copy with
    a leading 1, or None when it differs between samples."""
    v = c.value
    if v.dim() >= 1 and v.shape[0] == BATCH and torch.equal(v[:1].expand_as(v), v):
        return v[:1]
    return None


@handles(aten.add.Tensor, aten.mul.Tensor)
def _param_arith(call: Call):
    a, b = call.args[0], call.args[1]
    alpha = call.kwargs.get("alpha", call.args[2] if len(call.args) > 2 else 1)
    pair = (a, b) if isinstance(a, Act) else (b, a)
    if isinstance(pair[0], Act) and isinstance(pair[1], Const) and pair[1].pos is not None and alpha == 1:
        x, c = pair
        if c.pos.dim() > len(x.shape) + 1 or (c.pos.dim() == len(x.shape) + 1 and c.pos.shape[0] != 1):
            raise Unsupported("a parameter that differs along the batch")
        rule = ParamTableAdd(c.pos) if call.op is aten.add.Tensor else ParamTableMul(c.pos)
        return Lowered(rule, [x], {"param": Const(c.table, c.name, True)})
    if isinstance(pair[0], Act) and isinstance(pair[1], Const) and pair[1].param and alpha == 1:
        x, p = pair
        if p.value.dim() > len(x.shape) + 1 or (p.value.dim() == len(x.shape) + 1 and p.value.shape[0] != 1):
            raise Unsupported("a parameter that differs along the batch")
        rule = ParamAdd() if call.op is aten.add.Tensor else ParamMul()
        return Lowered(rule, [x], {"param": p})
    return _BEFORE[call.op](call)


@handles(aten.cat.default)
def _param_cat(call: Call):
    xs = list(call.arg(0))
    acts = [v for v in xs if isinstance(v, Act)]
    consts = [v for v in xs if isinstance(v, Const)]
    if len(xs) == 2 and len(acts) == 1 and len(consts) == 1 and consts[0].param:
        x, c = acts[0], consts[0]
        p = _per_sample(c)
        if p is None:
            raise Unsupported("a concatenation with a constant that differs between samples")
        dim = call.dim(call.arg(1, "dim", 0), len(x.shape) + 1)
        return Lowered(ParamConcat(dim, first=xs[0] is c), [x], {"param": Const(p, c.name, True)})
    return _BEFORE[aten.cat.default](call)
