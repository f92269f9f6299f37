"""Tensor plumbing: reshapes, permutes, slices, broadcasts and means. None keeps anything for
backward; all shapes are per sample and static (only the batch is left to the runtime)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Rule, sum_to
from .pool import GlobalAvgPool
from .registry import BATCH, Act, Call, Lowered, Unsupported, aten, handles
from .structural import Flatten

Tensor = torch.Tensor


class Reshape(Rule):
    """view / reshape / unsqueeze / squeeze to a per-sample `shape`."""

    kind = "reshape"

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def compute(self, xs, w):
        return xs[0].reshape(-1, *self.shape)

    def backward(self, g, kept, w, need):
        return [g.reshape(-1, *self.in_shapes[0])], {}

    def describe(self) -> str:
        return f"reshape to {'x'.join(map(str, self.shape))}"


class Permute(Rule):
    """A permutation of the per-sample dims (channel shuffles, layout changes)."""

    kind = "permute"

    def __init__(self, dims: tuple[int, ...]):
        self.dims = tuple(dims)

    def compute(self, xs, w):
        return xs[0].permute(0, *(d + 1 for d in self.dims))

    def backward(self, g, kept, w, need):
        inverse = sorted(range(len(self.dims)), key=lambda i: self.dims[i])
        return [g.permute(0, *(d + 1 for d in inverse))], {}


class Slice(Rule):
    """x[..., start:end:step, ...] along one per-sample dim. The backward places the gradient
    back with zeros elsewhere: a pad for step 1, an interleave with zeros and a pad otherwise."""

    kind = "slice"

    def __init__(self, dim: int, start: int, end: int, step: int = 1):
        self.dim, self.start, self.end, self.step = dim, start, end, step

    def compute(self, xs, w):
        idx = [slice(None)] * xs[0].dim()
        idx[self.dim + 1] = slice(self.start, self.end, self.step)
        return xs[0][tuple(idx)]

    def backward(self, g, kept, w, need):
        d, n, size = self.dim + 1, self.out_shape[self.dim], self.in_shapes[0][self.dim]
        if self.step > 1:
            shape = list(g.shape[1:])
            g = g.unsqueeze(d + 1)
            g = F.pad(g, _pad_at(g.dim(), d + 1, 0, self.step - 1))
            shape[self.dim] = n * self.step
            g = g.reshape(-1, *shape)
            length = n * self.step
            if self.start + length > size:  # trailing zeros past the end
                g = g.narrow(d, 0, size - self.start)
                length = size - self.start
        else:
            length = n
        return [F.pad(g, _pad_at(g.dim(), d, self.start, size - self.start - length))], {}

    def describe(self) -> str:
        return f"slice {self.start}:{self.end}:{self.step} of dim {self.dim}"


class Select(Rule):
    """x[..., index, ...]: one position of a per-sample dim, the dim dropped (e.g. x[:, 0])."""

    kind = "select"

    def __init__(self, dim: int, index: int):
        self.dim, self.index = dim, index

    def compute(self, xs, w):
        return xs[0].select(self.dim + 1, self.index)

    def backward(self, g, kept, w, need):
        d, size = self.dim + 1, self.in_shapes[0][self.dim]
        return [F.pad(g.unsqueeze(d), _pad_at(g.dim() + 1, d, self.index, size - self.index - 1))], {}

    def describe(self) -> str:
        return f"select {self.index} of dim {self.dim}"


def _pad_at(ndim: int, dim: int, before: int, after: int) -> tuple[int, ...]:
    """F.pad's pad tuple that pads only `dim` of an `ndim`-D tensor."""
    pads = [0, 0] * (ndim - dim)
    pads[-2:] = [before, after]
    return tuple(pads)


class Expand(Rule):
    """A broadcast to a larger per-sample shape; the backward sums it back."""

    kind = "expand"

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def compute(self, xs, w):
        return xs[0].expand(-1, *self.shape)

    def backward(self, g, kept, w, need):
        return [sum_to(g, self.in_shapes[0])], {}


class Mean(Rule):
    """Mean over per-sample dims (global pooling of any rank)."""

    kind = "mean"

    def __init__(self, dims: tuple[int, ...], keepdim: bool = False):
        self.dims, self.keepdim = tuple(sorted(dims)), keepdim

    def compute(self, xs, w):
        return xs[0].mean(tuple(d + 1 for d in self.dims), keepdim=self.keepdim)

    def backward(self, g, kept, w, need):
        shape = self.in_shapes[0]
        count = math.prod(shape[d] for d in self.dims)
        kept_shape = [1 if i in self.dims else s for i, s in enumerate(shape)]
        return [(g.reshape(-1, *kept_shape) / count).expand(-1, *shape).contiguous()], {}


# ---- which traced ops these rules run ------------------------------------------------------------

def _batch_first(size) -> None:
    if not size or size[0] not in (-1, BATCH):
        raise Unsupported(f"a reshape to {list(size)} that mixes the batch with other dims")


@handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints)
def _reshape(call: Call):
    x = call.act(0)
    out = call.out_shape
    if out is None:
        raise Unsupported("an unknown output shape")
    if call.op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        _batch_first(list(call.arg(1)))
    elif call.op is not aten.squeeze.default:
        dims = call.arg(1, "dim", [])
        for d in ([dims] if isinstance(dims, int) else dims):
            call.dim(d, len(x.shape) + (2 if call.op is aten.unsqueeze.default else 1))
    if math.prod(out) != math.prod(x.shape):
        raise Unsupported("a reshape that changes the batch")
    if out == x.shape:
        return x
    if len(out) == 1:
        return Lowered(Flatten(), [x])
    return Lowered(Reshape(out), [x])


@handles(aten.permute.default, aten.transpose.int, aten.t.default)
def _permute(call: Call):
    x = call.act(0)
    n = len(x.shape) + 1
    if call.op is aten.permute.default:
        dims = [d % n for d in call.arg(1)]
    else:
        a, b = (call.arg(1, "dim0", 0) % n, call.arg(2, "dim1", 1) % n) if call.op is aten.transpose.int else (0, 1)
        dims = list(range(n))
        dims[a], dims[b] = dims[b], dims[a]
    if dims[0] != 0:
        raise Unsupported("a permutation that moves the batch dimension")
    if dims == list(range(n)):
        return x
    return Lowered(Permute(tuple(d - 1 for d in dims[1:])), [x])


def _slice(x: Act, dim: int, start, end, step: int):
    size = x.shape[dim]
    start, end, _ = slice(start, end, step).indices(size)
    if step < 1:
        raise Unsupported("a slice with a non-positive step")
    if start == 0 and end >= size and step == 1:
        return x
    return Lowered(Slice(dim, start, max(end, start), step), [x])


@handles(aten.slice.Tensor)
def _slice_op(call: Call):
    x = call.act(0)
    dim = call.dim(call.arg(1, "dim", 0), len(x.shape) + 1)
    return _slice(x, dim, call.arg(2, "start"), call.arg(3, "end"), call.arg(4, "step", 1))


@handles(aten.select.int)
def _select(call: Call) -> Lowered:
    x = call.act(0)
    dim = call.dim(call.arg(1, "dim"), len(x.shape) + 1)
    return Lowered(Select(dim, call.arg(2, "index") % x.shape[dim]), [x])


@handles(aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.split_with_sizes_copy.default)
def _split(call: Call):
    x = call.act(0)
    dim = call.dim(call.arg(2, "dim", 0), len(x.shape) + 1)
    size = x.shape[dim]
    if call.op is aten.chunk.default:
        each = -(-size // call.arg(1))
        sizes = [min(each, size - i) for i in range(0, size, each)]
    elif call.op is aten.split.Tensor:
        each = call.arg(1)
        sizes = [min(each, size - i) for i in range(0, size, each)]
    else:
        sizes = list(call.arg(1))
    out, start = [], 0
    for s in sizes:
        out.append(_slice(x, dim, start, start + s, 1))
        start += s
    return out


@handles(aten.expand.default)
def _expand(call: Call):
    x = call.act(0)
    size = list(call.arg(1))
    if len(size) != len(x.shape) + 1 or size[0] not in (-1, BATCH):
        raise Unsupported("an expand that adds dimensions or changes the batch")
    out = tuple(s if s != -1 else x.shape[i] for i, s in enumerate(size[1:]))
    return x if out == x.shape else Lowered(Expand(out), [x])


@handles(aten.mean.dim)
def _mean(call: Call):
    x = call.act(0)
    n = len(x.shape) + 1
    dims = call.arg(1, "dim")
    dims = tuple(range(n)) if dims is None else ([dims] if isinstance(dims, int) else dims)
    dims = tuple(sorted({call.dim(d, n) for d in dims}))
    keepdim = bool(call.arg(2, "keepdim", False))
    if call.kwargs.get("dtype") not in (None, torch.float32):
        raise Unsupported("a mean in another dtype")
    if len(x.shape) == 3 and dims == (1, 2) and keepdim:
        return Lowered(GlobalAvgPool(), [x])
    return Lowered(Mean(dims, keepdim), [x])
