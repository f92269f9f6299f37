"""Conv2d (incl. depthwise and grouped) with BatchNorm folded in."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..batch_parts import BatchParts
from ..lowering import by_rows, in_blocks, int8_of, lowering_of, pins, replaying, runs_nchwc, summed_by_rows
from ..quant import int8_weight_linear, int8_weight_linear_input_grad
from .base import Need, Rule, Tensor


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def bias_grad(g: Tensor, chw: tuple[int, int, int], w) -> Tensor:
    """A per-channel bias's gradient, the sum over (N, H, W) of g (N, *chw); in two sums where the
    lowering asks for it: positions, then the batch (one constant shape, no Shape ops), or the batch,
    then positions (see `Lowering.batch_first_bias_sum`), or as two means XNNPACK runs where g is small
    enough (see `Lowering.xnnpack_bias_sum_max_bytes`)."""
    low = lowering_of(w)
    limit = low.xnnpack_bias_sum_max_bytes
    if limit is not None and g.numel() * g.element_size() <= limit:
        return _bias_grad_as_means(g)
    if low.two_step_bias_sum:
        return g.reshape(-1, chw[0], chw[1] * chw[2]).sum(2).sum(0)
    if low.batch_first_bias_sum:
        return g.sum(0).sum((1, 2))
    return g.sum((0, 2, 3))


def _bias_grad_as_means(g: Tensor) -> Tensor:
    """The sum over (N, H, W) of g as XNNPACK's means (4-D, over the last two dims, kept): positions
    of each sample, then the batch over the (N, C, 1, 1) means transposed and reshaped to (1, C, N, 1)
    (a permute straight to (1, C, N, 1) is copied between layouts outside the delegate call and cuts it)."""
    n, c, h, wd = g.shape
    per_sample = g.mean((2, 3), keepdim=True).permute(1, 0, 2, 3).clone().view(1, c, n, 1)
    return (per_sample.mean((2, 3), keepdim=True) * float(n * h * wd)).view(c)


# (a gradient sample's row and column in its stride x stride cell, symmetric padding, zero kernel taps as
# F.pad's (left, right, top, bottom)): see Conv2d._zero_insertion
ZeroInsertion = tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]


class Conv2d(Rule):
    kind = "conv2d"
    quantizable = True
    per_sample = True
    # a pointwise one reads its int8 weight as stored, as a linear, where the lowering asks (`_int8_linear`,
    # `Lowering.int8_linear_conv`)
    int8_as_linear = True

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
    def pointwise(self) -> bool:
        """A 1x1 conv (stride 1, one group, unpadded): a linear over the channels-last view."""
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.groups == 1 and not any(self.pads)

    def _int8_weight(self, w) -> tuple[Tensor, Tensor] | None:
        """The stored (int8 (Cout, Cin), scale) where this conv runs as the int8 linear
        (`Lowering.int8_pointwise_linear`), else None."""
        stored = int8_of(w, "weight")  # given only for the weights `Lowering.int8_linear_weights` names
        if stored is None:
            return None
        q, scale = stored
        return q.reshape(q.shape[0], -1), scale

    def _int8_linear(self, x: Tensor, w) -> Tensor | None:
        """This pointwise conv as a linear over the channels-last view whose weight is dequantized from its stored
        int8 by the op, None where the program holds no int8 for it. Same values."""
        stored = self._int8_weight(w)
        if stored is None:
            return None
        return int8_weight_linear(x.permute(0, 2, 3, 1), *stored).permute(0, 3, 1, 2)

    def _int8_linear_input_grad(self, g: Tensor, w) -> Tensor | None:
        """The input gradient of `_int8_linear` (`int8_weight_linear_input_grad` over the channels-last view)."""
        stored = self._int8_weight(w)
        if stored is None:
            return None
        return int8_weight_linear_input_grad(g.permute(0, 2, 3, 1), *stored).permute(0, 3, 1, 2)

    @property
    def symmetric(self) -> bool:
        t, b, l, r = self.pads
        return t == b and l == r

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        t, b, l, r = self.pads
        if self.symmetric:
            return x, (t, l)
        return F.pad(x, (l, r, t, b)), (0, 0)

    def _kernel_pads(self) -> tuple[tuple[int, int], tuple[int, int, int, int]] | None:
        """(symmetric padding, zero taps added to the kernel as F.pad's (left, right, top, bottom)) that
        compute this asymmetrically padded conv exactly: padded by max(before, after) on both sides, a
        window starts (max - before) rows early, which as many zero taps first skip (one tap spans the
        dilation, so the difference must be a multiple of it). None where symmetric or not so."""
        if self.symmetric:
            return None
        t, b, l, r = self.pads
        (dh, dw) = self.dilation
        if (t - b) % dh or (l - r) % dw:
            return None
        ph, pw = max(t, b), max(l, r)
        return (ph, pw), ((pw - l) // dw, (pw - r) // dw, (ph - t) // dh, (ph - b) // dh)

    def _zero_taps_fit(self, extend: tuple[int, int, int, int], w) -> bool:
        """Whether this conv's kernel with the zero taps `extend` (F.pad's (left, right, top, bottom)) stays
        within the lowering's depthwise tap limit (`Lowering.pads_in_kernel_max_depthwise_taps`)."""
        limit = lowering_of(w).pads_in_kernel_max_depthwise_taps
        if limit is None or not self._depthwise():
            return True
        (kh, kw), (left, right, top, bottom) = self.kernel, extend
        return (kh + top + bottom) * (kw + left + right) <= limit

    def by_rows(self, role):
        return role == "weight" and self.groups == 1

    def compute(self, xs, w):
        kernel_pads = self._kernel_pads() if lowering_of(w).pads_in_kernel and not in_blocks(w, "weight") else None
        if kernel_pads is not None and not self._zero_taps_fit(kernel_pads[1], w):
            kernel_pads = None  # an explicit pad, then the k x k conv
        as_linear = self._int8_linear(xs[0], w)
        if as_linear is not None:
            y = as_linear
        elif self._few_channels_one_mm(w) and w.trainable("weight"):  # implies _as_matmul
            y = self._forward_one_mm(xs[0], w["weight"])
        elif self._as_matmul(w) and w.trainable("weight"):
            y = self._taps(xs[0], self._forward_taps(w["weight"]), self.pads, self.out_chw[1:], self.stride)
        elif kernel_pads is not None:  # no pad op: the padding lives in the conv and zero kernel taps
            (pad, extend), x = kernel_pads, xs[0]
            y = F.conv2d(x, F.pad(w["weight"], extend), None, self.stride, pad, self.dilation, self.groups)
        elif in_blocks(w, "weight"):  # output channels by blocks of the weight's rows
            x, pad = self._padded(xs[0])
            y = torch.cat(by_rows(w, "weight", lambda lo, hi, wr: F.conv2d(x, wr, None, self.stride, pad,
                                                                           self.dilation)), 1)
        elif pins(w) and replaying(w):
            y = self._as_onnxruntime_runs_it(xs, w)
        else:
            x, pad = self._padded(xs[0])
            y = F.conv2d(x, w["weight"], None, self.stride, pad, self.dilation, self.groups)
        # The bias as a separate add: onnxruntime's depthwise kernel is several times slower with a
        # fused bias, and XNNPACK would bake a trainable bias into its frozen blob.
        return y + w["bias"].reshape(1, -1, 1, 1) if "bias" in w else y

    def _as_onnxruntime_runs_it(self, xs: list[Tensor], w) -> Tensor:
        """The bias-free conv as onnxruntime runs the exported one, for the analytic replay (meta tensors).
        The exporter folds a zero Pad into the Conv (`fuse_pad_into_conv`): no padded copy of the input.
        The bias is a separate Add: a frozen conv's input dies before it, where this conv is its last user.
        Malloc-traced on Lite0 224 b8 `side`: the peak is the 96 x 112 x 112 input of a stride-2 depthwise
        conv and its NCHWc copy (73.5 MB; `reads_nchwc`), or the expand conv's output and its bias sum, its
        16-channel input already freed; the replay had modelled a padded copy beside both (121 MB)."""
        x = xs[0]
        t, b, l, r = self.pads
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        h, wd = x.shape[-2:]
        # from w["weight"], not self.out_chw: reading it is what counts the dequantized kernel while the conv runs
        shape = (x.shape[0], w["weight"].shape[0],
                 (h + t + b - dh * (kh - 1) - 1) // sh + 1, (wd + l + r - dw * (kw - 1) - 1) // sw + 1)
        if w.trainable("weight"):  # the input is kept for the weight's gradient
            return x.new_empty(shape)
        xs[0] = None  # a last user drops its input (`Program`, `drops_inputs`): freed once the conv ran
        y = x.new_empty(shape)
        del x
        return y

    drops_inputs = True  # the replay of onnxruntime's schedule: a frozen conv's input dies before its bias Add

    def reads_nchwc(self, need) -> bool:
        # a depthwise conv whose kernel onnxruntime folds to a constant (frozen): traced, EfficientNet-B0-like
        return (self.groups > 1 and self.groups == self.in_chw[0] and runs_nchwc(self.groups)
                and "weight" not in need.params)

    def keep(self, xs, y, w, need):
        return {"x": xs[0]} if "weight" in need.params else {}

    def backward(self, g, kept, w, need):
        grads: dict[str, Tensor] = {}
        if "bias" in need.params:
            grads["bias"] = bias_grad(g, self.out_chw, w)
        if "weight" in need.params:
            grads["weight"] = (self._weight_grad_one_mm(kept["x"], g) if self._few_channels_one_mm(w)
                               else self._weight_grad_taps_mm(kept["x"], g) if self._as_matmul(w)
                               else self._weight_grad(kept["x"], g))
        gx = None
        zero_insertion = self._zero_insertion(w) if need.inputs[0] else None
        if need.inputs[0] and self._as_matmul(w) and w.trainable("weight") and self._flipped_pads() is not None:
            gx = self._taps(g, self._flipped_taps(w["weight"]), self._flipped_pads(), self.in_chw[1:], (1, 1))
        elif zero_insertion is not None:
            low = lowering_of(w)
            gx = self._zero_inserted_input_grad(g, w["weight"], zero_insertion, low.zero_inserted_split_bytes,
                                                low.batch_parts_carried)
        elif need.inputs[0] and (as_linear := self._int8_linear_input_grad(g, w)) is not None:
            gx = as_linear
        elif need.inputs[0]:
            cout = self.out_chw[0]  # by row blocks: each block's output channels' share, added
            shifted = lowering_of(w).shifted_strided_input_grad
            gx = summed_by_rows(w, "weight", lambda lo, hi, wr: self._input_grad(
                g if hi - lo == cout else g[:, lo:hi].clone(), wr, shifted))
        return [gx], grads

    def _flipped_pads(self) -> tuple[int, int, int, int] | None:
        """The pads of the conv with the flipped, transposed kernel that is this conv's input gradient
        (exact for stride 1 and symmetric pads of at most the dilated kernel's reach), else None."""
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        t, _, l, _ = self.pads
        if self.stride == (1, 1) and self.symmetric and t <= dh * (kh - 1) and l <= dw * (kw - 1):
            ph, pw = dh * (kh - 1) - t, dw * (kw - 1) - l
            return (ph, ph, pw, pw)
        return None

    def _shift(self, t: int, b: int, extra: int, s: int, d: int) -> tuple[int, int, int] | None:
        """(zero rows before the gradient, ConvTranspose padding, output padding) that give exactly the
        input's rows of one spatial dim: padded rows [t, t + size) of the transposed conv, which with z
        zero rows first is shifted by z*s, then cropped by p = t + z*s from both ends and extended by the
        output padding at the end; `extra` = the padded extent past what the last tap reads (>= 0).
        None where ConvTranspose's limits (output padding < max(stride, dilation)) allow no such z."""
        z = max(0, -(-(b - t - extra) // s))
        op = extra + t - b + z * s
        return (z, t + z * s, op) if 0 <= op < max(s, d) else None

    def _input_grad(self, g: Tensor, weight: Tensor, shifted: bool = False) -> Tensor:
        h, wd = self.in_chw[1:]
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        t, b, l, r = self.pads
        flipped = self._flipped_pads()
        if flipped is not None:
            # Exact: a stride-1 conv's input gradient is a conv with the flipped, transposed kernel.
            # Cheaper than ConvTranspose in onnxruntime, which is slow for depthwise kernels.
            pad = (flipped[0], flipped[2])
            return F.conv2d(g, self._flip_transpose(weight), None, 1, pad, self.dilation, self.groups)
        ho, wo = self.out_chw[1:]
        sh, sw = self.stride
        if self.symmetric:
            oph = h - ((ho - 1) * sh - 2 * t + dh * (kh - 1) + 1)
            opw = wd - ((wo - 1) * sw - 2 * l + dw * (kw - 1) + 1)
            return F.conv_transpose2d(g, weight, None, self.stride, (t, l), (oph, opw), self.groups, self.dilation)
        oph = h + t + b - ((ho - 1) * sh + dh * (kh - 1) + 1)
        opw = wd + l + r - ((wo - 1) * sw + dw * (kw - 1) + 1)
        rows, cols = self._shift(t, b, oph, sh, dh), self._shift(l, r, opw, sw, dw)
        if shifted and rows is not None and cols is not None:
            g = F.pad(g, (cols[0], 0, rows[0], 0)) if rows[0] or cols[0] else g
            return F.conv_transpose2d(g, weight, None, self.stride, (rows[1], cols[1]), (rows[2], cols[2]),
                                      self.groups, self.dilation)
        gx = F.conv_transpose2d(g, weight, None, self.stride, 0, (oph, opw), self.groups, self.dilation)
        return gx[:, :, t : t + h, l : l + wd].clone()  # a copy, as in the exported Slice: frees gx

    def _zero_insertion(self, w) -> ZeroInsertion | None:
        """How a strided depthwise conv's input gradient is one stride-1 conv with the flipped kernel over the
        gradient with zeros inserted (`Lowering.zero_inserted_depthwise_input_grad`): (the position of each
        gradient sample in its stride x stride cell of zeros, symmetric padding, zero taps added to the flipped
        kernel as F.pad's (left, right, top, bottom)). None where the lowering does not ask for it, the conv is
        not a strided depthwise one with a frozen kernel, or an axis has no such form."""
        if not (lowering_of(w).zero_inserted_depthwise_input_grad and self._depthwise() and self.stride != (1, 1)
                and not w.trainable("weight")):
            return None
        t, b, l, r = self.pads
        rows = self._zero_insertion_axis(self.kernel[0], self.stride[0], self.dilation[0], t, self.in_chw[1],
                                         self.out_chw[1])
        cols = self._zero_insertion_axis(self.kernel[1], self.stride[1], self.dilation[1], l, self.in_chw[2],
                                         self.out_chw[2])
        if rows is None or cols is None:
            return None
        return (rows[0], cols[0]), (rows[1], cols[1]), (*cols[2], *rows[2])

    @staticmethod
    def _zero_insertion_axis(k: int, s: int, d: int, before: int, size: int, out: int
                             ) -> tuple[int, int, tuple[int, int]] | None:
        """One axis of `_zero_insertion`: (z, padding, (zero taps first, zero taps last)). With u the gradient's
        `out` samples spread to `out`*s positions, sample j at z + j*s and zeros elsewhere, the input gradient
        is gx[i] = sum over taps a' of u[i - P + a'*d] * flipped[a'], a conv padded by P = (k-1)d - before - z
        before and Q = size + before + z - out*s after. Unequal pads become max(P, Q) on both sides and |P - Q| / d zero taps on the side
        padded less (exact, as `_kernel_pads`); the z with the fewest is taken."""
        best = None
        for z in range(s):
            p, q = (k - 1) * d - before - z, size + before + z - out * s
            if p < 0 or q < 0 or (p - q) % d:
                continue
            extra = ((q - p) // d, 0) if q > p else (0, (p - q) // d)
            if best is None or sum(extra) < sum(best[2]):
                best = (z, max(p, q), extra)
        return best

    def _zero_inserted_input_grad(self, g: Tensor, weight: Tensor, plan: ZeroInsertion,
                                  split_bytes: int | None = None, carried: bool = False) -> Tensor | BatchParts:
        """The input gradient as `_zero_insertion` plans it. The zeros come from a broadcast multiply by a
        constant one-hot stride x stride cell (XNNPACK: one fast op; a pad or a stack of the 6-D view moves
        one value per row), then one stride-1 depthwise conv, which XNNPACK runs in its dwconv kernels; by
        batch parts where the zero-inserted gradient is larger than `split_bytes`, joined by a cat, or `carried`
        on as they are (`Lowering.batch_parts_carried`)."""
        (zh, zw), pad, extend = plan
        (c, ho, wo), (sh, sw) = self.out_chw, self.stride
        cell = torch.tensor([[float(i == zh and j == zw) for j in range(sw)] for i in range(sh)],
                            dtype=g.dtype, device=g.device)
        kernel = self._flip_transpose(weight)
        kernel = F.pad(kernel, extend) if any(extend) else kernel

        def part(gp: Tensor) -> Tensor:
            u = (gp.reshape(-1, c, ho, 1, wo, 1) * cell.reshape(1, 1, 1, sh, 1, sw)).reshape(-1, c, ho * sh, wo * sw)
            return F.conv2d(u, kernel, None, 1, pad, self.dilation, self.groups)

        sizes = self._batch_parts(int(g.shape[0]), g[:1].numel() * sh * sw * g.element_size(), split_bytes)
        if len(sizes) == 1:
            return part(g)
        parts = BatchParts.split(g, sizes, part)  # carried: each made when the program's backward reaches it
        return parts if carried else parts.joined()

    @staticmethod
    def _batch_parts(n: int, sample_bytes: int, limit: int | None) -> list[int]:
        """The batch sizes of the fewest near-equal parts of n samples of `sample_bytes` each, each part at most
        `limit` bytes where one sample fits (`Lowering.zero_inserted_split_bytes`); [n] where no limit."""
        parts = 1 if limit is None else min(n, max(1, -(-n * sample_bytes // limit)))
        return [n // parts + (i < n % parts) for i in range(parts)]

    def _flip_transpose(self, weight: Tensor) -> Tensor:
        cout, cin_g, kh, kw = weight.shape
        gr = self.groups
        wt = weight.reshape(gr, cout // gr, cin_g, kh, kw).transpose(1, 2).reshape(gr * cin_g, cout // gr, kh, kw)
        return wt if (kh, kw) == (1, 1) else wt.flip(2, 3)

    # ---- convolutions with a computed kernel as one matmul per kernel tap (Lowering.computed_conv_as_matmul)

    def _depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_chw[0] == self.out_chw[0]

    def _as_matmul(self, w) -> bool:
        return lowering_of(w).computed_conv_as_matmul and (self.groups == 1 or self._depthwise())

    def _forward_taps(self, weight: Tensor) -> Callable[[int, int], Tensor]:
        """The kernel of tap (a, b): dense (1, Cin, Cout), depthwise (1, C, 1, 1)."""
        if self._depthwise():
            c, kh, kw = weight.shape[0], *self.kernel
            k = weight.reshape(c, kh, kw).permute(1, 2, 0)
            return lambda a, b: k[a, b].reshape(1, c, 1, 1)
        k = weight.permute(2, 3, 1, 0)  # (kh, kw, Cin, Cout)
        return lambda a, b: k[a : a + 1, b : b + 1].reshape(1, *k.shape[2:])

    def _flipped_taps(self, weight: Tensor) -> Callable[[int, int], Tensor]:
        """The taps of the flipped, transposed kernel (the stride-1 input gradient's): dense (1, Cout, Cin)."""
        kh, kw = self.kernel
        if self._depthwise():
            fwd = self._forward_taps(weight)
            return lambda a, b: fwd(kh - 1 - a, kw - 1 - b)
        k = weight.permute(2, 3, 0, 1)  # (kh, kw, Cout, Cin)
        return lambda a, b: k[kh - 1 - a : kh - a, kw - 1 - b : kw - b].reshape(1, *k.shape[2:])

    def _taps(self, x: Tensor, tap: Callable[[int, int], Tensor], pads: tuple[int, int, int, int],
              out_hw: tuple[int, int], stride: tuple[int, int]) -> Tensor:
        """conv2d(x, kernel) (NCHW in and out) as the sum over kernel taps of the tap's strided window of
        the padded input times the tap's kernel: dense, a batched matmul of the channels-last window
        (1, N*Ho*Wo, Cin) by (1, Cin, Cout); depthwise, a product with the per-channel (1, C, 1, 1)."""
        n, (ho, wo), (kh, kw) = int(x.shape[0]), out_hw, self.kernel
        t, b, l, r = pads
        dense = not self._depthwise()
        if dense:
            x = x.permute(0, 2, 3, 1)
            x = F.pad(x, (0, 0, l, r, t, b)) if any(pads) else x
        elif any(pads):
            x = F.pad(x, (l, r, t, b))
        acc = None
        for a in range(kh):
            for b in range(kw):
                rows, cols = self._window(a, b, out_hw, stride)
                if dense:
                    part = torch.bmm(x[:, rows, cols].reshape(1, n * ho * wo, -1), tap(a, b))
                else:
                    part = x[:, :, rows, cols] * tap(a, b)
                acc = part if acc is None else acc + part
        return acc.reshape(n, ho, wo, -1).permute(0, 3, 1, 2) if dense else acc

    def _window(self, a: int, b: int, out_hw: tuple[int, int], stride: tuple[int, int]) -> tuple[slice, slice]:
        (ho, wo), (sh, sw), (dh, dw) = out_hw, stride, self.dilation
        return slice(a * dh, a * dh + sh * (ho - 1) + 1, sh), slice(b * dw, b * dw + sw * (wo - 1) + 1, sw)

    def _weight_grad_taps_mm(self, x: Tensor, g: Tensor) -> Tensor:
        """dW per tap as one batched matmul of the gradient (.., Cout, N*Ho*Wo) by the tap's window of the
        padded input (.., N*Ho*Wo, Cin): dense, one matrix; depthwise, one row per channel."""
        n, (cin, h, wd), (cout, ho, wo), (kh, kw) = int(x.shape[0]), self.in_chw, self.out_chw, self.kernel
        t, b, l, r = self.pads
        p = n * ho * wo
        if self._depthwise():  # channels first: (C, N, H, W); per channel (1, P) @ (P, 1)
            xc, gm = x.permute(1, 0, 2, 3), g.permute(1, 0, 2, 3).reshape(cout, 1, p)
            xc = F.pad(xc, (l, r, t, b)) if any(self.pads) else xc
            window = lambda rows, cols: xc[:, :, rows, cols].reshape(cin, p, 1)  # noqa: E731
        else:  # channels last: (N, H, W, Cin); (1, Cout, P) @ (1, P, Cin)
            xc, gm = x.permute(0, 2, 3, 1), g.permute(1, 0, 2, 3).reshape(1, cout, p)
            xc = F.pad(xc, (0, 0, l, r, t, b)) if any(self.pads) else xc
            window = lambda rows, cols: xc[:, rows, cols].reshape(1, p, cin)  # noqa: E731
        taps = [torch.bmm(gm, window(*self._window(a, b, (ho, wo), self.stride)))
                for a in range(kh) for b in range(kw)]
        return torch.stack(taps, -1).reshape(cout, -1, kh, kw)

    def _few_channels_one_mm(self, w) -> bool:
        limit = lowering_of(w).few_channel_conv_one_matmul_max_cin
        return self._as_matmul(w) and self.groups == 1 and limit is not None and self.in_chw[0] <= limit

    def _forward_one_mm(self, x: Tensor, weight: Tensor) -> Tensor:
        """conv2d(x, weight) for all taps as one batched matmul: the taps' channels-last windows of the padded
        input side by side (1, N*Ho*Wo, kh*kw*Cin) by the kernel (1, kh*kw*Cin, Cout)."""
        n, cin, (cout, ho, wo), (kh, kw) = int(x.shape[0]), self.in_chw[0], self.out_chw, self.kernel
        t, b, l, r = self.pads
        xc = x.permute(0, 2, 3, 1)  # (N, H, W, Cin)
        xc = F.pad(xc, (0, 0, l, r, t, b)) if any(self.pads) else xc
        windows = [xc[:, rows, cols] for rows, cols in
                   (self._window(a, c, (ho, wo), self.stride) for a in range(kh) for c in range(kw))]
        cols = torch.cat(windows, -1).reshape(1, n * ho * wo, kh * kw * cin)
        kernel = weight.permute(2, 3, 1, 0).reshape(1, kh * kw * cin, cout)
        return torch.bmm(cols, kernel).reshape(n, ho, wo, cout).permute(0, 3, 1, 2)

    def _weight_grad_one_mm(self, x: Tensor, g: Tensor) -> Tensor:
        """dW for all taps as one batched matmul: the taps' windows of the padded input, channels first and
        stacked tap by tap (1, kh*kw*Cin, N*Ho*Wo), by the channels-last gradient (1, N*Ho*Wo, Cout)."""
        n, cin, (cout, ho, wo), (kh, kw) = int(x.shape[0]), self.in_chw[0], self.out_chw, self.kernel
        t, b, l, r = self.pads
        xc = x.permute(1, 0, 2, 3)  # (Cin, N, H, W)
        xc = F.pad(xc, (l, r, t, b)) if any(self.pads) else xc
        windows = [xc[:, :, rows, cols] for rows, cols in
                   (self._window(a, c, (ho, wo), self.stride) for a in range(kh) for c in range(kw))]
        cols = torch.cat(windows, 0).reshape(1, kh * kw * cin, n * ho * wo)
        gm = g.permute(0, 2, 3, 1).reshape(1, n * ho * wo, cout)
        return torch.bmm(cols, gm).reshape(kh, kw, cin, cout).permute(3, 2, 0, 1)

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
        if b < 0 or r < 0:  # rows/columns no tap reads: a slice (ExecuTorch's pad rejects negative pads)
            xt = xt[:, :, : h + min(b, 0), : wd + min(r, 0)]
            b, r = max(b, 0), max(r, 0)
        if t == b and l == r:
            pad = (t, l)
        else:  # a zero Pad the ONNX pass folds into the Conv
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

    def reads_nchwc(self, need) -> bool:
        return False

    def backward(self, g, kept, w, need):
        c, _, n = self.in_chw
        kept = {"x": kept["x"].reshape(-1, c, 1, n)} if "x" in kept else kept
        (gx,), grads = super().backward(g.reshape(-1, *self.out_chw), kept, _Weight2d(w), need)
        if "weight" in grads:
            grads["weight"] = grads["weight"].squeeze(2)
        if isinstance(gx, BatchParts):  # carried on (`Lowering.batch_parts_carried`): each part reshaped when made
            return [gx.mapped(lambda part: part.reshape(-1, c, n))], grads
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
