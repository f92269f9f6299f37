"""Pooling. Only non-overlapping windows (kernel == stride, no padding) have rules; they cover the
supported models and their backward needs no scatter."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Rule, upsample_to


class MaxPool2d(Rule):
    """Keeps a boolean one-hot of each window's maximum (the first one on ties, as torch does).
    Windows are laid out as a trailing k*k axis, so forward is a max over it and backward a
    broadcast multiply: no indices, scatter or upsampling in the exported program."""

    kind = "maxpool"

    def __init__(self, k: int):
        self.k = k

    def compute(self, xs, w):
        return F.max_pool2d(xs[0], self.k, self.k)

    def _windows(self, x):
        c, h, w = self.in_shapes[0]
        k = self.k
        ho, wo = h // k, w // k
        if (ho * k, wo * k) != (h, w):
            x = x[:, :, : ho * k, : wo * k]
        return x.reshape(-1, c, ho, k, wo, k).permute(0, 1, 2, 4, 3, 5).reshape(-1, c, ho, wo, k * k)

    def forward(self, xs, w, need):
        if not need.inputs[0]:
            return self.compute(xs, w), {}
        win = self._windows(xs[0])
        first = win.argmax(-1, keepdim=True)
        onehot = first == torch.arange(self.k * self.k, device=win.device)
        return win.amax(-1), {"m": onehot}

    def backward(self, g, kept, w, need):
        k = self.k
        c, ho, wo = self.out_shape
        h, wd = self.in_shapes[0][1:]
        gw = (g.unsqueeze(-1) * kept["m"].to(g.dtype)).reshape(-1, c, ho, wo, k, k)
        gx = gw.permute(0, 1, 2, 4, 3, 5).reshape(-1, c, ho * k, wo * k)
        if ho * k != h or wo * k != wd:
            gx = F.pad(gx, (0, wd - wo * k, 0, h - ho * k))
        return [gx], {}

    def describe(self) -> str:
        return f"maxpool{self.k}"


class AvgPool2d(Rule):
    kind = "avgpool"

    def __init__(self, k: int):
        self.k = k

    def compute(self, xs, w):
        return F.avg_pool2d(xs[0], self.k, self.k)

    def backward(self, g, kept, w, need):
        return [upsample_to(g / (self.k * self.k), self.out_shape, self.k, tuple(self.in_shapes[0][1:]))], {}

    def describe(self) -> str:
        return f"avgpool{self.k}"


class GlobalAvgPool(Rule):
    kind = "global_avgpool"

    def compute(self, xs, w):
        return xs[0].mean((2, 3), keepdim=True)

    def backward(self, g, kept, w, need):
        c, h, wd = self.in_shapes[0]
        return [(g / (h * wd)).expand(-1, c, h, wd).contiguous()], {}  # materialised, as ONNX Expand is


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Call, Lowered, Unsupported, aten, handles  # noqa: E402


def _one(v, n: int = 2) -> int | None:
    v = [v] * n if isinstance(v, int) else list(v)
    if len(v) == 1:
        v = v * n
    return v[0] if all(e == v[0] for e in v) else None


def _non_overlapping(kernel, stride, padding) -> int:
    k, s = _one(kernel), _one(stride or kernel)
    if k is None or k != s or any(padding or [0]):
        raise Unsupported(f"pooling with kernel {list(kernel)}, stride {list(stride or kernel)}, padding "
                          f"{list(padding or [0])} (only kernel == stride without padding has a rule)")
    return k


@handles(aten.max_pool2d_with_indices.default, aten.max_pool2d.default)
def _max_pool(call: Call):
    x = call.act(0)
    k = _non_overlapping(call.arg(1, "kernel_size"), call.arg(2, "stride"), call.arg(3, "padding"))
    if any(d != 1 for d in (call.arg(4, "dilation") or [1])) or call.arg(5, "ceil_mode", False):
        raise Unsupported("max pooling with dilation or ceil_mode")
    if call.op is aten.max_pool2d.default:
        return Lowered(MaxPool2d(k), [x])
    return Lowered(MaxPool2d(k), [x]), None  # (values, indices): nothing may use the indices


@handles(aten.avg_pool2d.default)
def _avg_pool(call: Call) -> Lowered:
    x = call.act(0)
    k = _non_overlapping(call.arg(1, "kernel_size"), call.arg(2, "stride"), call.arg(3, "padding"))
    if call.arg(4, "ceil_mode", False) or call.arg(6, "divisor_override") is not None:
        raise Unsupported("average pooling with ceil_mode or divisor_override")
    return Lowered(AvgPool2d(k), [x])


@handles(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool(call: Call) -> Lowered:
    x = call.act(0)
    _, h, w = x.shape
    o = _one(call.arg(1, "output_size"))
    if o == 1:
        return Lowered(GlobalAvgPool(), [x])
    if o and h == w and h % o == 0:
        return Lowered(AvgPool2d(h // o), [x])
    raise Unsupported(f"adaptive average pooling of {h}x{w} to {list(call.arg(1))}")
