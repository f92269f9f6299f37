"""Conv2d (incl. depthwise and grouped) with BatchNorm folded in."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..lowering import EAGER, by_rows, in_blocks, summed_by_rows
from .base import Need, Rule, Tensor


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def bias_grad(g: Tensor, chw: tuple[int, int, int], w) -> Tensor:
    """A per-channel bias's gradient, the sum over (N, H, W) of g (N, *chw); in two sums (positions,
    then the batch; one constant shape, no Shape ops) where the lowering asks for it."""
    if getattr(w, "lowering", EAGER).two_step_bias_sum:
        return g.reshape(-1, chw[0], chw[1] * chw[2]).sum(2).sum(0)
    return g.sum((0, 2, 3))


class Conv2d(Rule):
    kind = "conv2d"
    quantizable = True

    def __init__(self, kernel, stride=1, padding=0, dilation=1, groups=1):
        self.kernel = _pair(kernel)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.groups = groups
        if isinstance(padding, int) or len(padding) == 2:
            ph, pw = _pair(padding)
            padding = (ph, ph, pw, pw)
        self.pads = tuple(padding)  # (top, bottom, left, right)

    def on_bind(self, in_shapes, out_shape):
        super().on_bind(in_shapes, out_shape)
        self.in_chw, self.out_chw = tuple(in_shapes[0]), tuple(out_shape)  # the (C, H, W) it computes on

    @property
    def symmetric(self) -> bool:
        t, b, l, r = self.pads
        return t == b and l == r

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        t, b, l, r = self.pads
        if self.symmetric:
            return x, (t, l)
        return F.pad(x, (l, r, t, b)), (0, 0)

    def by_rows(self, role):
        return role == "weight" and self.groups == 1

    def compute(self, xs, w):
        x, pad = self._padded(xs[0])
        if in_blocks(w, "weight"):  # output channels by blocks of the weight's rows
            y = torch.cat(by_rows(w, "weight", lambda lo, hi, wr: F.conv2d(x, wr, None, self.stride, pad,
                                                                           self.dilation)), 1)
        else:
            y = F.conv2d(x, w["weight"], None, self.stride, pad, self.dilation, self.groups)
        # The bias as a separate add: onnxruntime's depthwise kernel is several times slower with a
        # fused bias, and XNNPACK would bake a trainable bias into its frozen blob.
        return y + w["bias"].reshape(1, -1, 1, 1) if "bias" in w else y

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if "weight" in need.params else {}

    def backward(self, g, kept, w, need):
        grads: dict[str, Tensor] = {}
        if "bias" in need.params:
            grads["bias"] = bias_grad(g, self.out_chw, w)
        if "weight" in need.params:
            grads["weight"] = self._weight_grad(kept["x"], g)
        gx = None
        if need.inputs[0]:
            cout = self.out_chw[0]  # by row blocks: each block's output channels' share, added
            gx = summed_by_rows(w, "weight", lambda lo, hi, wr: self._input_grad(
                g if hi - lo == cout else g[:, lo:hi].clone(), wr))
        return [gx], grads

    def _input_grad(self, g: Tensor, weight: Tensor) -> Tensor:
        h, wd = self.in_chw[1:]
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        t, b, l, r = self.pads
        if self.stride == (1, 1) and self.symmetric and t <= dh * (kh - 1) and l <= dw * (kw - 1):
            # Exact: a stride-1 conv's input gradient is a conv with the flipped, transposed kernel.
            # Cheaper than ConvTranspose in onnxruntime, which is slow for depthwise kernels.
            pad = (dh * (kh - 1) - t, dw * (kw - 1) - l)
            return F.conv2d(g, self._flip_transpose(weight), None, 1, pad, self.dilation, self.groups)
        ho, wo = self.out_chw[1:]
        sh, sw = self.stride
        if self.symmetric:
            oph = h - ((ho - 1) * sh - 2 * t + dh * (kh - 1) + 1)
            opw = wd - ((wo - 1) * sw - 2 * l + dw * (kw - 1) + 1)
            return F.conv_transpose2d(g, weight, None, self.stride, (t, l), (oph, opw), self.groups, self.dilation)
        oph = h + t + b - ((ho - 1) * sh + dh * (kh - 1) + 1)
        opw = wd + l + r - ((wo - 1) * sw + dw * (kw - 1) + 1)
        gx = F.conv_transpose2d(g, weight, None, self.stride, 0, (oph, opw), self.groups, self.dilation)
        return gx[:, :, t : t + h, l : l + wd].clone()  # a copy, as in the exported Slice: frees gx

    def _flip_transpose(self, weight: Tensor) -> Tensor:
        cout, cin_g, kh, kw = weight.shape
        gr = self.groups
        wt = weight.reshape(gr, cout // gr, cin_g, kh, kw).transpose(1, 2).reshape(gr * cin_g, cout // gr, kh, kw)
        return wt if (kh, kw) == (1, 1) else wt.flip(2, 3)

    def _weight_grad(self, x: Tensor, g: Tensor) -> Tensor:
        # dW[o, i, a, b] = sum over batch and positions of g[n, o, y, x] * xpad[n, i, y*s + a*d, x*s + b*d].
        # Shapes are static Python ints (only the batch is left to the runtime), so it exports cleanly.
        # Measured in onnxruntime (one thread, Lite0 shapes): a kxk kernel as one convolution with batch
        # and channels swapped is 2-7x faster than a matmul per kernel tap; a 1x1 kernel as one batched
        # matmul over the batch is 4-8x faster than one tap, unless the channels dwarf the positions.
        cin, cout = self.in_chw[0], self.out_chw[0]
        p = self.out_chw[1] * self.out_chw[2]
        if self.kernel != (1, 1):
            return self._weight_grad_conv(x, g)
        if self.groups == 1 and self.stride == (1, 1) and not any(self.pads) and cin * cout <= p * (cin + cout):
            # (N, Cout, P) @ (N, P, Cin) summed over N; onnxruntime fuses the transpose into the matmul
            return torch.matmul(g.reshape(-1, cout, p), x.reshape(-1, cin, p).transpose(1, 2)).sum(0).reshape(
                cout, cin, 1, 1)
        return self._weight_grad_taps(x, g)

    def _weight_grad_conv(self, x: Tensor, g: Tensor) -> Tensor:
        # The input with batch and channels swapped, (Cin_g, G*N, H, W), convolved with the gradient as
        # the kernel, (Cout, N, Ho, Wo), in G groups: the stride becomes the dilation and the dilation
        # the stride, and the result is (Cin_g, Cout, kh, kw).
        cin, h, wd = self.in_chw
        cout, ho, wo = self.out_chw
        gr = self.groups
        cin_g, cout_g = cin // gr, cout // gr
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        t, b, l, r = self.pads
        # trim the far pads to what the last tap reads: the result is then exactly kh x kw
        b = (kh - 1) * dh + sh * (ho - 1) + 1 - t - h
        r = (kw - 1) * dw + sw * (wo - 1) + 1 - l - wd
        # the batch as a Python int: ONNX Conv's exporter needs the kernel's (gt's) shape, and the
        # exported train step's batch is static anyway
        n = int(x.shape[0])
        xt = x.reshape(n, gr, cin_g, h, wd).permute(2, 1, 0, 3, 4).reshape(cin_g, gr * n, h, wd)
        gt = g.reshape(n, gr, cout_g, ho, wo).permute(1, 2, 0, 3, 4).reshape(cout, n, ho, wo)
        if t == b and l == r:
            pad = (t, l)
        else:  # a zero Pad the ONNX pass folds into the Conv (a crop where negative: stays a Pad)
            xt, pad = F.pad(xt, (l, r, t, b)), (0, 0)
        dw_ = F.conv2d(xt, gt, None, self.dilation, pad, self.stride, gr)
        return dw_.permute(1, 0, 2, 3)

    def _weight_grad_taps(self, x: Tensor, g: Tensor) -> Tensor:
        # one strided slice of the input and one batched matmul per kernel tap
        x, pad = self._padded(x)
        if pad != (0, 0):
            x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
        cin = self.in_chw[0]
        cout, ho, wo = self.out_chw
        gr = self.groups
        cin_g, cout_g = cin // gr, cout // gr
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        # (G, Cout_g, N*P) once, then per tap (G, N*P, Cin_g): explicit copies in torch and in the
        # exported Transpose alike, so the memory model sees what runtimes allocate.
        gm = g.reshape(-1, gr, cout_g, ho * wo).permute(1, 2, 0, 3).reshape(gr, cout_g, -1)
        taps = []
        for a in range(kh):
            for b in range(kw):
                xs = x[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh, b * dw : b * dw + sw * (wo - 1) + 1 : sw]
                xm = xs.reshape(-1, gr, cin_g, ho * wo).permute(1, 0, 3, 2).reshape(gr, -1, cin_g)
                taps.append(torch.matmul(gm, xm))
        return torch.stack(taps, -1).reshape(cout, cin_g, kh, kw)

    def describe(self) -> str:
        kind = "depthwise " if self.groups > 1 and self.groups == self.in_chw[0] else ""
        return f"{kind}conv{self.kernel[0]}x{self.kernel[1]}/s{self.stride[0]}"


class _Weight2d(Mapping[str, Tensor]):
    """A Conv1d's tensors as its (N, C, 1, L) Conv2d sees them: weight (O, I, K) -> (O, I, 1, K)."""

    def __init__(self, w: Mapping[str, Tensor]):
        self.w = w

    def __getitem__(self, role: str) -> Tensor:
        t = self.w[role]
        return t.unsqueeze(2) if role == "weight" else t

    def __iter__(self):
        return iter(self.w)

    def __len__(self) -> int:
        return len(self.w)

    def row_blocks(self, role: str, fn, add: bool = False):
        inner = getattr(self.w, "row_blocks", None)
        if inner is None:
            t = self[role]
            return [fn(0, t.shape[0], t)]
        return inner(role, lambda lo, hi, t: fn(lo, hi, t.unsqueeze(2) if role == "weight" else t), add)

    def __getattr__(self, name: str):  # the program Weights' lowering, trainable(), in_blocks()
        if name == "w":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.w, name)


class Conv1d(Conv2d):
    """`aten.convolution` with 1-D arguments: the Conv2d rule on an (N, C, 1, L) view, weight
    (O, I, K) as (O, I, 1, K). `padding` is p or (left, right)."""

    kind = "conv1d"

    def __init__(self, kernel, stride=1, padding=0, dilation=1, groups=1):
        one = lambda v: int(v) if isinstance(v, int) else int(v[0])  # noqa: E731
        if isinstance(padding, int) or len(padding) == 1:
            left = right = one(padding)
        else:
            left, right = padding
        super().__init__((1, one(kernel)), (1, one(stride)), (0, 0, left, right), (1, one(dilation)), groups)

    def on_bind(self, in_shapes, out_shape):
        Rule.on_bind(self, in_shapes, out_shape)
        (c, n), = in_shapes
        self.in_chw = (c, 1, n)
        self.out_chw = (out_shape[0], 1, out_shape[1]) if out_shape else ()

    def compute(self, xs, w):
        # static sizes (once bound), so exporters' shape inference keeps them
        y = super().compute([xs[0].reshape(-1, *self.in_chw)], _Weight2d(w))
        return y.reshape(-1, self.out_chw[0], self.out_chw[2]) if self.out_chw else y.squeeze(2)

    def backward(self, g, kept, w, need):
        c, _, n = self.in_chw
        kept = {"x": kept["x"].reshape(-1, c, 1, n)} if "x" in kept else kept
        (gx,), grads = super().backward(g.reshape(-1, *self.out_chw), kept, _Weight2d(w), need)
        if "weight" in grads:
            grads["weight"] = grads["weight"].squeeze(2)
        return [gx.reshape(-1, c, n) if gx is not None else None], grads

    def describe(self) -> str:
        return f"conv1d k{self.kernel[1]}/s{self.stride[1]}"


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Call, Lowered, Unsupported, aten, handles  # noqa: E402


def _conv(x, w, b, stride, padding, dilation, groups) -> Lowered:
    if w is None or w.value.dim() not in (3, 4):
        raise Unsupported(f"{w.value.dim() - 2 if w is not None else '?'}-D convolution (1-D and 2-D have rules)")
    params = {"weight": w} | ({"bias": b} if b is not None else {})
    kernel = tuple(w.value.shape[2:])
    one = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
    if w.value.dim() == 3:
        if isinstance(padding, str):  # 'valid' or 'same' (stride 1; torch puts the odd sample last)
            total = 0 if padding == "valid" else one(dilation) * (kernel[0] - 1)
            padding = (total // 2, total - total // 2)
        return Lowered(Conv1d(kernel[0], one(stride), padding, one(dilation), groups), [x], params)
    if isinstance(padding, str):
        total = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(_pair(dilation), kernel)]
        padding = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    padding = tuple(padding) if isinstance(padding, tuple) and len(padding) == 4 else _pair(padding)
    return Lowered(Conv2d(kernel, _pair(stride), padding, _pair(dilation), groups), [x], params)


@handles(aten.convolution.default)
def _convolution(call: Call) -> Lowered:
    stride, padding, dilation, transposed, _, groups = call.args[3:9]
    if transposed:
        raise Unsupported("transposed convolution")
    return _conv(call.act(0), call.const(1), call.const(2), stride, padding, dilation, groups)


@handles(aten.conv2d.default, aten.conv2d.padding, aten.conv1d.default, aten.conv1d.padding)
def _conv_nd(call: Call) -> Lowered:
    return _conv(call.act(0), call.const(1), call.const(2, "bias"), call.arg(3, "stride", 1),
                 call.arg(4, "padding", 0), call.arg(5, "dilation", 1), call.arg(6, "groups", 1))
