"""Pooling, 1-D and 2-D. A 1-D input (N, C, L) runs as (N, C, 1, L), so one code path serves both.

Max pooling keeps, per output, the position of its maximum inside its window as a small integer
(uint8 for up to 256 taps); average and adaptive pooling keep nothing. Every backward is exact
and written without scatter or index ops: a gradient is spread back over its window tap by tap,
each tap a shifted add on its stride phase's grid, the phases interleaved by a reshape (`_spread`);
adaptive pooling is a matmul with constant averaging matrices, and so is upsampling (nearest,
bilinear): both are linear maps, separable per spatial axis."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..lowering import max_pool_in_arithmetic, pins, replaying, runs_nchwc
from ..quant import small_int_as_int8, small_int_from_int8
from .base import Rule, Tensor, upsample_to

IntArg = int | Sequence[int]


def _expand(v: IntArg | None, nd: int, default: IntArg | None = None) -> tuple[int, ...]:
    if v is None or (not isinstance(v, int) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(a) for a in v)
    return v * nd if len(v) == 1 else v


def pooled_length(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling output size (pooling_output_shape): ceil_mode drops a last window that
    would start in the right padding."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class _Windowed(Rule):
    """Shared geometry of a pooling over windows: kernel, stride, padding, dilation per spatial
    dim as 2-D tuples (a 1-D pooling gets height 1), set when shapes are bound."""

    def __init__(self, kernel_size: IntArg, stride: IntArg | None, padding: IntArg, dilation: IntArg,
                 ceil_mode: bool):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, bool(ceil_mode)

    def on_bind(self, in_shapes, out_shape):
        super().on_bind(in_shapes, out_shape)
        shape = in_shapes[0]
        self.nd = len(shape) - 1
        if self.nd not in (1, 2):
            raise ValueError(f"{self.kind}: expected a (C, L) or (C, H, W) input, got {shape}")
        nd = self.nd
        k = _expand(self.kernel_size, nd)
        s = _expand(self.stride, nd, k)
        p, d = _expand(self.padding, nd), _expand(self.dilation, nd)
        lift = (lambda t, one: (one, *t)) if nd == 1 else (lambda t, one: t)
        self.k, self.s, self.p, self.d = lift(k, 1), lift(s, 1), lift(p, 0), lift(d, 1)
        self.c = shape[0]
        self.hw = (1, shape[1]) if nd == 1 else tuple(shape[1:])
        geometry = zip(self.hw, self.k, self.s, self.p, self.d)
        self.out_hw = tuple(pooled_length(n, k, s, p, d, self.ceil_mode) for n, k, s, p, d in geometry)
        self.taps = self.k[0] * self.k[1]

    def _4d(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """(N, C, L) as (N, C, 1, L); static sizes, so exporters' shape inference keeps them."""
        return x.reshape(-1, self.c, 1, hw[1]) if self.nd == 1 else x

    def _nd(self, y: Tensor, hw: tuple[int, int]) -> Tensor:
        return y.reshape(-1, self.c, hw[1]) if self.nd == 1 else y

    @property
    def tiles(self) -> bool:
        """Windows are disjoint, undilated and unpadded (kernel == stride)."""
        return self.k == self.s and self.d == (1, 1) and self.p == (0, 0) and not self.ceil_mode

    def _reach(self) -> tuple[int, int]:
        """Extent of the padded input the windows touch, per spatial dim."""
        return tuple((o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(self.out_hw, self.s, self.d, self.k))

    def _pad(self, x: Tensor, value: float) -> Tensor:
        """The input padded so that every window is a plain strided slice (ceil_mode's last
        windows may reach past the right padding: they get more of `value`)."""
        (h, w), (ph, pw), (rh, rw) = self.hw, self.p, self._reach()
        pads = (pw, max(0, rw - w - pw), ph, max(0, rh - h - ph))
        return F.pad(x, pads, value=value) if any(pads) else x

    drops_inputs = True  # the replay of onnxruntime's schedule: MaxPool's input dies after its pad

    def _tap(self, xp: Tensor, a: int, b: int) -> Tensor:
        (ho, wo), (sh, sw), (dh, dw) = self.out_hw, self.s, self.d
        return xp[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh, b * dw : b * dw + sw * (wo - 1) + 1 : sw]

    def _spread(self, tap_grad: Callable[..., Tensor], chain: bool = False) -> Tensor:
        """Sum each output's gradient into its window: tap t (row a, column b) of output (i, j) is
        input (i*s + a*d, j*s + b*d). Split by stride phase, r = a*d mod s, that is coarse row
        i + a*d // s of phase r: so each tap's (N, C, Ho, Wo) gradient `tap_grad(t)` is padded
        (shifted) onto its phase's coarse grid and added, and the phases are interleaved into the
        input grid by one stack and reshape. A scatter-add with no scatter, and only one tap's
        gradient alive at a time (a stacked grouped transposed conv held all k*k of them).
        With `chain`, `tap_grad(t, last)` also gets the sum the previous tap was added into (None
        for the first), to make tap t depend on it: onnxruntime otherwise computes every tap's
        gradient before adding any (measured: 9 gradient-sized tensors alive in a 3x3 max pool)."""
        (kh, kw), (sh, sw), (dh, dw) = self.k, self.s, self.d
        (ho, wo), (h, w), (ph, pw) = self.out_hw, self.hw, self.p
        rh, rw = self._reach()
        hc, wc = -(-rh // sh), -(-rw // sw)  # coarse grid of every phase
        phases: dict[tuple[int, int], Tensor] = {}
        last: Tensor | None = None
        for a in range(kh):
            for b in range(kw):
                (oa, ra), (ob, rb) = divmod(a * dh, sh), divmod(b * dw, sw)
                t = tap_grad(a * kw + b, last) if chain else tap_grad(a * kw + b)
                pads = (ob, wc - wo - ob, oa, hc - ho - oa)
                t = F.pad(t, pads) if any(pads) else t
                phases[ra, rb] = last = phases[ra, rb] + t if (ra, rb) in phases else t
                del t
        del last
        if (sh, sw) == (1, 1):
            gx = phases[0, 0]
        else:
            some = next(iter(phases.values()))
            grid = [phases.pop((r, c), None) for r in range(sh) for c in range(sw)]
            grid = [torch.zeros_like(some) if p is None else p for p in grid]  # a phase no tap reaches
            del some
            # (N, C, sh, sw, hc, wc) -> (N, C, hc, sh, wc, sw): row hc*sh + r, column wc*sw + c
            gx = torch.stack(grid, 2)
            grid.clear()  # each step frees what it consumed, as the memory model assumes runtimes do
            gx = gx.reshape(-1, self.c, sh, sw, hc, wc).permute(0, 1, 4, 2, 5, 3).reshape(-1, self.c, hc * sh, wc * sw)
        fh, fw = gx.shape[2:]
        if fh < ph + h or fw < pw + w:  # the last rows/columns no window reaches get no gradient
            gx = F.pad(gx, (0, max(0, pw + w - fw), 0, max(0, ph + h - fh)))
            fh, fw = gx.shape[2:]
        if (ph, pw, fh, fw) != (0, 0, h, w):
            gx = gx[:, :, ph : ph + h, pw : pw + w].clone()  # a copy, as the exported Slice: frees gx
        return gx


def _exact_zero(t: Tensor) -> Tensor:
    """A one-element 0.0 computed from `t` (NaN and inf included): a data dependency on `t` for
    graph runtimes with their own scheduler, at the cost of one element."""
    return (t.reshape(-1)[:1] > float("inf")).to(t.dtype)


def _rank_if_max(v: Tensor, m: Tensor, rank: float | Tensor) -> Tensor:
    """`rank` where a tap's value v equals its window's maximum m (v <= m), else 0, in float ops XNNPACK
    runs: 1 + floor(max(v - m, -1)) is 1 or 0 (a float difference is 0 only for equal floats)."""
    return (torch.floor((v - m).clamp(min=-1.0)) + 1.0) * rank


class MaxPool(_Windowed):
    """`aten.max_pool2d_with_indices` (and `max_pool1d`): any kernel, stride, padding, dilation
    and ceil_mode. Keeps the argmax position inside its window (uint8 up to 256 taps), computed
    by a running max over the window's taps, strided slices of the -inf-padded input; the first
    maximum wins ties, as in torch. The backward sends g to tap t through `where(idx == t)` and
    adds each tap into place (`_spread`). Measured against max_pool2d(return_indices) converted to
    in-window positions (also exact, same ties in onnxruntime and ExecuTorch): this forward is
    faster on ExecuTorch with XNNPACK (27 vs 34-39 ms), slower in onnxruntime (123 vs 72 ms;
    8x64x56x56, 3x3/s2/p1, one thread), and needs no int64 indices. Under `Lowering.max_pool_in_arithmetic`
    (ExecuTorch) the forward and backward are float arithmetic instead, no bool op (`_forward_in_arithmetic`)."""

    kind = "maxpool"

    def __init__(self, kernel_size: IntArg, stride: IntArg | None = None, padding: IntArg = 0,
                 dilation: IntArg = 1, ceil_mode: bool = False):
        super().__init__(kernel_size, stride, padding, dilation, ceil_mode)

    def on_bind(self, in_shapes, out_shape):
        super().on_bind(in_shapes, out_shape)
        t = self.taps
        self.index_dtype = torch.uint8 if t <= 256 else torch.int32

    def compute(self, xs, w):
        x = self._4d(xs[0], self.hw)
        if replaying(w):  # meta tensors: torch's pool also makes int64 positions, the exported MaxPool does not
            return self._nd(x.new_empty((x.shape[0], self.c, *self.out_hw)), self.out_hw)
        return self._nd(F.max_pool2d(x, self.k, self.s, self.p, self.d, self.ceil_mode), self.out_hw)

    def reads_nchwc(self, need) -> bool:
        # the plain pool (no input gradient) exports as a MaxPool: traced, mnist_cnn `side`'s stem pool
        return not need.inputs[0] and runs_nchwc(self.c)

    def forward(self, xs, w, need):
        if not need.inputs[0]:
            return self.compute(xs, w), {}
        if pins(w) and replaying(w):
            return self._as_onnxruntime_runs_it(xs)
        if self._in_arithmetic(w):
            return self._forward_in_arithmetic(xs)
        xp = self._pad(self._4d(xs[0], self.hw), float("-inf"))
        kh, kw = self.k
        # Every tap's view first (free in eager): onnxruntime's default order is a depth-first walk
        # back from the outputs that visits an op's latest-created input first, so slices created
        # before the running max are each computed just before their comparison, not all up front.
        views = [self._tap(xp, t // kw, t % kw) for t in range(self.taps)]
        m = views[0]
        idx = torch.zeros_like(m, dtype=self.index_dtype)
        for t in range(1, self.taps):
            v = views[t]
            better = v > m  # strict: the first maximum stays
            m = torch.where(better, v, m)
            idx = torch.where(better, torch.tensor(t, dtype=self.index_dtype, device=m.device), idx)
        return self._nd(m, self.out_hw), {"i": idx}

    def _in_arithmetic(self, w) -> bool:
        # Not in the analytic replay: there its float temporaries would count as planned memory, while
        # ExecuTorch holds them in XNNPACK's workspace (modelled apart, exporters/et_workspace.py); the
        # bool path it replays instead keeps the same byte per output.
        return max_pool_in_arithmetic(w) and self.taps <= 128 and not replaying(w)  # positions fit int8

    def _forward_in_arithmetic(self, xs: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The forward above in float ops XNNPACK runs (`Lowering.max_pool_in_arithmetic`): the pool, then
        each tap t's 1 + floor(max(v - m, -1)), 1 where the tap holds the window's maximum m and else 0
        (exact: v <= m, and a float difference is 0 only for equal floats); the first such tap is the
        one with the largest T - t among them (T taps), so the position is T - max_t(hit_t * (T - t)).
        Kept as int8 (quantized inside XNNPACK). A tap's values are step-1 slices (XNNPACK copies no
        strided one): disjoint windows' of the input permuted to (N, C, kh*kw, Ho, Wo), so that every op
        runs along rows (on the (N, C, Ho, kh, Wo, kw) view the inner dim was kw: 5 ms slower on mnist_cnn
        b32, as was a second pool over the ranks on the input grid), other windows' of the padded input's
        stride phases."""
        x = self._4d(xs[0], self.hw)
        m = F.max_pool2d(x, self.k, self.s, self.p, self.d, self.ceil_mode)
        best = self._tiled_first_max(x, m) if self.tiles else self._tapped_first_max(x, m)
        return self._nd(m, self.out_hw), {"i": small_int_as_int8(self.taps - best)}

    def _tiled_first_max(self, x: Tensor, m: Tensor) -> Tensor:
        (kh, kw), (ho, wo) = self.k, self.out_hw
        if (ho * kh, wo * kw) != tuple(x.shape[2:]):  # rows and columns no window reaches
            x = x[:, :, : ho * kh, : wo * kw]
        taps = x.reshape(-1, self.c, ho, kh, wo, kw).permute(0, 1, 3, 5, 2, 4).reshape(-1, self.c, self.taps, ho, wo)
        rank = self.taps - torch.arange(self.taps, dtype=x.dtype, device=x.device).reshape(1, 1, self.taps, 1, 1)
        ranked = _rank_if_max(taps, m.reshape(-1, self.c, 1, ho, wo), rank)
        del taps
        best = ranked[:, :, :1]
        for t in range(1, self.taps):
            best = torch.maximum(best, ranked[:, :, t : t + 1])
        return best.reshape(-1, self.c, ho, wo)

    def _tapped_first_max(self, x: Tensor, m: Tensor) -> Tensor:
        best = None
        for t, v in enumerate(self._unstrided_taps(x)):
            ranked = _rank_if_max(v, m, float(self.taps - t))
            best = ranked if best is None else torch.maximum(best, ranked)
            del v, ranked
        return best

    def _unstrided_taps(self, x: Tensor):
        """Each tap's (N, C, Ho, Wo) values, in tap order, by slices of step 1 (XNNPACK copies no other):
        the -inf-padded input as its stride phases, (N, C, sh*sw*hc, wc), tap (a, b) at phase
        (a*d mod s) and coarse offset a*d // s, as `_spread` places them back."""
        (kh, kw), (sh, sw), (dh, dw) = self.k, self.s, self.d
        (ho, wo), (h, w), (ph, pw) = self.out_hw, self.hw, self.p
        rh, rw = self._reach()
        hc, wc = -(-rh // sh), -(-rw // sw)
        if h + ph > hc * sh or w + pw > wc * sw:  # rows and columns past every window
            x = x[:, :, : hc * sh - ph, : wc * sw - pw]
            h, w = x.shape[2:]
        xp = F.pad(x, (pw, wc * sw - w - pw, ph, hc * sh - h - ph), value=float("-inf"))
        if (sh, sw) != (1, 1):
            xp = xp.reshape(-1, self.c, hc, sh, wc, sw).permute(0, 1, 3, 5, 2, 4).reshape(-1, self.c, sh * sw * hc, wc)
        for a in range(kh):
            for b in range(kw):
                (oa, ra), (ob, rb) = divmod(a * dh, sh), divmod(b * dw, sw)
                top = (ra * sw + rb) * hc + oa
                yield xp[:, :, top : top + ho, ob : ob + wo]

    def _as_onnxruntime_runs_it(self, xs: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The forward above as onnxruntime runs its exported program, for the analytic replay
        (malloc-traced, ResNet-18-like stem pool, 8x8x64x64): the input dies after the pad; a tap
        is two Slice copies, one of its rows (alive through that row's taps) and one of its
        columns; and the positions are chosen only after the running max, so every comparison's
        bool mask lives until then. A tap is sliced just before its comparison (the first two
        together), and a row dies once its last tap is sliced. Same results as `forward`."""
        x = self._4d(xs[0], self.hw)
        xs[0] = None  # this node is the input's last user (`Program`, `drops_inputs`)
        xp = self._pad(x, float("-inf"))
        del x
        (kh, kw), (ho, wo), (sh, sw), (dh, dw) = self.k, self.out_hw, self.s, self.d
        m, better = None, []
        for a in range(kh):
            row = xp[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh].clone()
            if a == kh - 1:
                xp = None
            for b in range(kw):
                v = row[:, :, :, b * dw : b * dw + sw * (wo - 1) + 1 : sw].clone()
                if b == kw - 1:
                    row = None  # its last tap is sliced
                if m is None:
                    m = v
                    continue
                better.append(v > m)
                m = torch.where(better[-1], v, m)
                v = None
        idx = torch.zeros_like(m, dtype=self.index_dtype)
        for t in range(1, len(better) + 1):
            idx = torch.where(better.pop(0), torch.tensor(t, dtype=self.index_dtype, device=m.device), idx)
        return self._nd(m, self.out_hw), {"i": idx}

    def backward(self, g, kept, w, need):
        g = self._4d(g, self.out_hw)
        if self._in_arithmetic(w):
            return [self._nd(self._backward_in_arithmetic(g, small_int_from_int8(kept["i"])), self.hw)], {}
        idx = kept["i"].to(g.dtype)  # compared as float: integer Equal kernels are patchy in runtimes
        square_tiles = self.tiles and self.nd == 2 and self.k[0] == self.k[1]
        if self.tiles and not pins(w):
            gx = self._tile_where(g, idx)
        elif square_tiles:
            box = [g, idx]
            del g, idx
            gx = self._tile_spread(box)
        else:
            gx = self._spread(
                lambda t, last=None: torch.where(idx == (t if last is None else _exact_zero(last) + t), g, 0.0),
                chain=pins(w))
        return [self._nd(gx, self.hw)], {}

    def _backward_in_arithmetic(self, g: Tensor, idx: Tensor) -> Tensor:
        """The backward without bool ops (`Lowering.max_pool_in_arithmetic`): tap t gets g * relu(1 - |idx - t|),
        1 exactly where the integer position idx is t. Disjoint windows as `_tile_where` (one broadcast
        product on the (N, C, Ho, kh, Wo, kw) grid), others tap by tap through `_spread`."""
        if not self.tiles:
            return self._spread(lambda t: g * torch.relu(1.0 - torch.abs(idx - float(t))))
        (kh, kw), (ho, wo), (h, w) = self.k, self.out_hw, self.hw
        taps = torch.arange(kh * kw, dtype=g.dtype, device=g.device).reshape(1, 1, kh, kw, 1, 1)
        hit = torch.relu(1.0 - torch.abs(idx.reshape(-1, self.c, 1, 1, ho, wo) - taps))
        gx = g.reshape(-1, self.c, 1, 1, ho, wo) * hit
        del hit
        gx = gx.permute(0, 1, 4, 2, 5, 3).reshape(-1, self.c, ho * kh, wo * kw)
        if (ho * kh, wo * kw) != (h, w):
            gx = F.pad(gx, (0, w - wo * kw, 0, h - ho * kh))
        return gx

    def _tile_where(self, g: Tensor, idx: Tensor) -> Tensor:
        """Disjoint windows: the input gradient as (N, C, Ho, kh, Wo, kw), row i*kh + a and column
        j*kw + b, made by one broadcast `where(idx == tap, g, 0)` and read as (N, C, Ho*kh, Wo*kw)
        (a view), then rows and columns past the last window get no gradient. Alive: the gradient,
        its positions as float and one bool input-size mask; the taps stacked and pixel-shuffled
        (ONNX DepthToSpace) held the k*k masked taps, their stack and the shuffled copy at once
        (mnist_cnn's first pool, batch 1: 225 KB of temporaries against 150 KB). Not for onnxruntime:
        its broadcasting Where measured 11.2 MB against 7.3 MB for the taps (mnist_cnn batch 32
        `bias+mask`, whole step), so pinned lowerings keep `_tile_spread`."""
        (kh, kw), (ho, wo), (h, w) = self.k, self.out_hw, self.hw
        taps = torch.arange(kh * kw, dtype=g.dtype, device=g.device).reshape(1, 1, 1, kh, 1, kw)
        hit = idx.reshape(-1, self.c, ho, 1, wo, 1) == taps
        gx = torch.where(hit, g.reshape(-1, self.c, ho, 1, wo, 1), 0.0)
        del hit
        gx = gx.reshape(-1, self.c, ho * kh, wo * kw)
        if (ho * kh, wo * kw) != (h, w):
            gx = F.pad(gx, (0, w - wo * kw, 0, h - ho * kh))
        return gx

    drops_grad = True  # `_tile_spread` drops the incoming gradient after its last tap (the replay's `Program`)

    def _tile_spread(self, box: list[Tensor]) -> Tensor:
        """Disjoint square windows, for onnxruntime: each tap's masked gradient stacked as k*k channels
        per channel and interleaved into the input grid by one pixel shuffle (ONNX DepthToSpace), then rows and
        columns past the last window get no gradient. Same live memory as `_spread`; measured in
        onnxruntime (one thread, 32x32x28x28 input, median of 150) 8.2 ms against its 10.2 (its
        stack, 6-D transpose and reshape). Upsampling g and the positions (Resize) was as fast but
        held 4 input sizes instead of 2."""
        k, (ho, wo), (h, w) = self.k[0], self.out_hw, self.hw
        g, idx = box  # box = [g, positions as float]: emptied, so both die after the last tap
        box.clear()
        taps = [torch.where(idx == t, g, 0.0) for t in range(k * k)]
        # onnxruntime frees both once the last tap is made, before the stack (profiled, mnist_cnn `full` b32:
        # the stem pool's taps and their Concat, 6.1 MB; the replay held the gradient and positions too)
        del g, idx
        taps = torch.stack(taps, 2)  # (N, C, k*k, Ho, Wo)
        gx = F.pixel_shuffle(taps.reshape(-1, self.c * k * k, ho, wo), k)
        del taps
        if (ho * k, wo * k) != (h, w):
            gx = F.pad(gx, (0, w - wo * k, 0, h - ho * k))
        return gx

    def describe(self) -> str:
        k, s = self.k[-self.nd :], self.s[-self.nd :]
        return f"maxpool{'x'.join(map(str, k))}/s{s[-1]}"


class MaxPool2d(MaxPool):
    """kernel == stride, no padding (the original rule's interface)."""

    def __init__(self, k: int):
        super().__init__(k, k)


class AvgPool(_Windowed):
    """`aten.avg_pool2d` (and `avg_pool1d`): kernel, stride, padding, ceil_mode, count_include_pad,
    divisor_override as torch. Keeps nothing: each output's divisor is a constant of the shapes."""

    kind = "avgpool"

    def __init__(self, kernel_size: IntArg, stride: IntArg | None = None, padding: IntArg = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None):
        super().__init__(kernel_size, stride, padding, 1, ceil_mode)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override

    def on_bind(self, in_shapes, out_shape):
        super().on_bind(in_shapes, out_shape)
        div = [[self._divisor(i, j) for j in range(self.out_hw[1])] for i in range(self.out_hw[0])]
        flat = {v for row in div for v in row}
        self.recip = 1.0 / flat.pop() if len(flat) == 1 else 1.0 / torch.tensor(div, dtype=torch.float32)
        self.ones = torch.ones(self.c, 1, *self.k)

    def _divisor(self, i: int, j: int) -> int:
        # torch's avg_pool2d: the window clipped to the padded input, then (unless count_include_pad)
        # to the input itself
        size, real = 1, 1
        for o, n, k, s, p in zip((i, j), self.hw, self.k, self.s, self.p):
            start = o * s - p
            end = min(start + k, n + p)
            size *= end - start
            real *= min(end, n) - max(start, 0)
        if self.divisor_override:
            return int(self.divisor_override)
        return size if self.count_include_pad else real

    def _scale(self, t: Tensor) -> Tensor:
        return t * (self.recip if isinstance(self.recip, float) else self.recip.to(t.device, t.dtype))

    @property
    def _native(self) -> bool:
        """torch's and ONNX's AveragePool agree (ceil_mode's clipped windows and divisor_override
        are where they differ); otherwise the window sums come from a depthwise ones conv."""
        return not self.ceil_mode and self.divisor_override is None

    def reads_nchwc(self, need) -> bool:
        return self._native and runs_nchwc(self.c)  # an AveragePool (Lite0 `side`'s taps, profiled)

    def compute(self, xs, w):
        x = self._4d(xs[0], self.hw)
        if self._native:
            y = F.avg_pool2d(x, self.k, self.s, self.p, False, self.count_include_pad)
        else:
            y = self._scale(F.conv2d(self._pad(x, 0.0), self.ones.to(x.device, x.dtype), None, self.s, 0, 1, self.c))
        return self._nd(y, self.out_hw)

    def backward(self, g, kept, w, need):
        g = self._scale(self._4d(g, self.out_hw))
        if self.tiles and self.k[0] == self.k[1]:  # one expand + reshape
            gx = upsample_to(g, (self.c, *self.out_hw), self.k[0], self.hw)
        else:
            gx = self._spread(lambda t: g)
        return [self._nd(gx, self.hw)], {}

    def describe(self) -> str:
        k, s = self.k[-self.nd :], self.s[-self.nd :]
        return f"avgpool{'x'.join(map(str, k))}/s{s[-1]}"


class AvgPool2d(AvgPool):
    """kernel == stride, no padding (the original rule's interface)."""

    def __init__(self, k: int):
        super().__init__(k, k)


def _averaging(size: int, out: int) -> torch.Tensor:
    """(out, size) matrix whose row i averages torch's adaptive window i:
    [floor(i*size/out), ceil((i+1)*size/out))."""
    a = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, math.ceil((i + 1) * size / out)
        a[i, start:end] = 1.0 / (end - start)
    return a


def per_axis_matmul(t: Tensor, mats: dict[int, Tensor], last: int, transpose: bool) -> Tensor:
    """t with each spatial axis `dim` mapped by its matrix A (out × in): A applied along that axis, or
    Aᵀ (`transpose`: the backward). `last` is t's last axis, taken as (.., W) @ Aᵀ."""
    for dim, a in mats.items():
        a = a.to(t.device, t.dtype)
        if dim == last:  # (.., W) @ Aᵀ, or back with A
            t = torch.matmul(t, a if transpose else a.t())
        else:  # A @ (.., H, W), or back with Aᵀ
            t = torch.matmul(a.t() if transpose else a, t)
    return t


class AdaptiveAvgPool(Rule):
    """`aten._adaptive_avg_pool2d` (and 1-D): any output size, including ones that do not divide
    the input (torch's start/end windows). Separable: y = A_h · x · A_wᵀ with constant averaging
    matrices, so forward and backward are matmuls; an output of 1 is a mean. Keeps nothing."""

    kind = "adaptive_avgpool"

    def __init__(self, output_size: IntArg | Sequence[int | None]):
        self.output_size = output_size

    def on_bind(self, in_shapes, out_shape):
        super().on_bind(in_shapes, out_shape)
        shape = in_shapes[0]
        self.nd = len(shape) - 1
        size = self.output_size
        size = (size,) * self.nd if isinstance(size, int) else tuple(size) * (self.nd if len(size) == 1 else 1)
        self.sizes = tuple(n if o is None else int(o) for n, o in zip(shape[1:], size))
        self.dims = tuple(range(2, 2 + self.nd))
        self.mats = {dim: _averaging(n, o) for dim, n, o in zip(self.dims, shape[1:], self.sizes) if n != o}

    @property
    def is_global(self) -> bool:
        return all(o == 1 for o in self.sizes)

    def _apply(self, t: Tensor, transpose: bool) -> Tensor:
        return per_axis_matmul(t, self.mats, 1 + self.nd, transpose)

    def compute(self, xs, w):
        if self.is_global:
            return xs[0].mean(self.dims, keepdim=True)
        return self._apply(xs[0], False)

    def backward(self, g, kept, w, need):
        if self.is_global:
            shape = self.in_shapes[0]
            n = math.prod(shape[1:])
            return [(g / n).expand(-1, *shape).contiguous()], {}  # materialised, as ONNX Expand is
        return [self._apply(g, True)], {}

    def describe(self) -> str:
        return f"{self.kind}{'x'.join(map(str, self.sizes))}"


class GlobalAvgPool(AdaptiveAvgPool):
    """Mean over every spatial position (output size 1)."""

    kind = "global_avgpool"

    def __init__(self):
        super().__init__(1)

    def describe(self) -> str:
        return self.kind


class GlobalMaxPool(Rule):
    """`aten.adaptive_max_pool{1,2}d` to 1 (global max pooling). Keeps, per channel, the position
    of its maximum (uint8 up to 256 positions, else int32; the first maximum wins ties, as in
    torch); the backward sends g there by comparing the positions with a constant ramp."""

    kind = "global_maxpool"

    def on_bind(self, in_shapes, out_shape):
        super().on_bind(in_shapes, out_shape)
        shape = in_shapes[0]
        self.c, self.n = shape[0], math.prod(shape[1:])
        self.pooled = (self.c, *[1] * (len(shape) - 1))
        self.index_dtype = torch.uint8 if self.n <= 256 else torch.int32

    def compute(self, xs, w):
        return xs[0].reshape(-1, self.c, self.n).amax(2).reshape(-1, *self.pooled)

    def forward(self, xs, w, need):
        if not need.inputs[0]:
            return self.compute(xs, w), {}
        flat = xs[0].reshape(-1, self.c, self.n)
        y, idx = flat.max(2)
        return y.reshape(-1, *self.pooled), {"i": idx.to(self.index_dtype)}

    def backward(self, g, kept, w, need):
        ramp = torch.arange(self.n, dtype=g.dtype, device=g.device)
        hit = ramp == kept["i"].to(g.dtype).reshape(-1, self.c, 1)  # compared as float, as MaxPool
        gx = torch.where(hit, g.reshape(-1, self.c, 1), 0.0)
        return [gx.reshape(-1, *self.in_shapes[0])], {}


_RESIZE_OPS = {"nearest": torch.ops.aten.upsample_nearest2d.default,
               "nearest-exact": torch.ops.aten._upsample_nearest_exact2d.default,
               "linear": torch.ops.aten.upsample_bilinear2d.default}


def _resize_matrix(size: int, out: int, mode: str, align_corners: bool, scale: float | None) -> torch.Tensor:
    """(out, size) matrix of torch's 1-D resampling along one axis: column i is how input i spreads
    over the outputs, computed by torch's own 2-D kernel on one-hot inputs (the other axis 1 → 1),
    so its index rounding and `scale_factor` semantics are torch's own."""
    basis = torch.eye(size, dtype=torch.float64).reshape(1, size, size, 1)
    op = _RESIZE_OPS[mode]
    args = (basis, [out, 1], align_corners, scale, None) if mode == "linear" else (basis, [out, 1], scale, None)
    return op(*args).reshape(size, out).t().float()


class Upsample(Rule):
    """`aten.upsample_nearest{1,2}d`, `_upsample_nearest_exact{1,2}d`, `upsample_bilinear2d`,
    `upsample_linear1d` (F.interpolate, nn.Upsample), any output size or scale factor, with or
    without align_corners. Keeps nothing: per spatial axis the resampling is a constant matrix A,
    y = A_h · x · A_wᵀ and dL/dx = A_hᵀ · g · A_w. Nearest by an integer factor k (the common ×2) is
    instead a repeat (expand + reshape) whose backward sums each k×k block."""

    kind = "upsample"

    def __init__(self, mode: str, out_size: Sequence[int], align_corners: bool = False,
                 scales: Sequence[float | None] | None = None):
        self.mode, self.size, self.align_corners = mode, tuple(int(v) for v in out_size), bool(align_corners)
        self.scales = tuple(scales) if scales else (None,) * len(self.size)

    def on_bind(self, in_shapes, out_shape):
        super().on_bind(in_shapes, out_shape)
        shape = in_shapes[0]
        self.c, self.hw = shape[0], tuple(shape[1:])
        self.dims = tuple(range(2, 2 + len(self.hw)))
        self.mats = {d: _resize_matrix(n, o, self.mode, self.align_corners, s)
                     for d, n, o, s in zip(self.dims, self.hw, self.size, self.scales)}
        self.repeat = self._repeat_factors()

    def _repeat_factors(self) -> tuple[int, ...] | None:
        """k per axis when every axis repeats each input k times (nearest by an integer factor)."""
        ks = []
        for (d, a), n in zip(self.mats.items(), self.hw):
            k = a.shape[0] // n
            if a.shape[0] != k * n or not torch.equal(a, torch.eye(n).repeat_interleave(k, 0)):
                return None
            ks.append(k)
        return tuple(ks)

    def _apply(self, t: Tensor, back: bool) -> Tensor:
        kept = {d: a for d, a in self.mats.items()  # an axis left as it is needs no matmul
                if not (a.shape[0] == a.shape[1] and torch.equal(a, torch.eye(a.shape[0])))}
        return per_axis_matmul(t, kept, 1 + len(self.hw), back)

    def compute(self, xs, w):
        x = xs[0]
        if self.repeat is None:
            return self._apply(x, False)
        c, hw, ks = self.c, self.hw, self.repeat
        if len(hw) == 1:
            return x[:, :, :, None].expand(-1, c, hw[0], ks[0]).reshape(-1, c, *self.size)
        return x[:, :, :, None, :, None].expand(-1, c, hw[0], ks[0], hw[1], ks[1]).reshape(-1, c, *self.size)

    def backward(self, g, kept, w, need):
        if self.repeat is None:
            return [self._apply(g, True)], {}
        c, hw, ks = self.c, self.hw, self.repeat
        if len(hw) == 1:
            return [g.reshape(-1, c, hw[0], ks[0]).sum(3)], {}
        return [g.reshape(-1, c, hw[0], ks[0], hw[1], ks[1]).sum((3, 5))], {}

    def describe(self) -> str:
        mode = "bilinear" if self.mode == "linear" and len(self.size) == 2 else self.mode
        return f"upsample {mode} to {'x'.join(map(str, self.size))}"


# ---- which traced ops these rules run ------------------------------------------------------------

from .registry import Call, Lowered, aten, handles  # noqa: E402

_WITH_INDICES = (aten.max_pool2d_with_indices.default, aten.max_pool1d_with_indices.default)


@handles(aten.max_pool2d_with_indices.default, aten.max_pool2d.default, aten.max_pool1d.default,
         aten.max_pool1d_with_indices.default)
def _max_pool(call: Call):
    rule = MaxPool(call.arg(1, "kernel_size"), call.arg(2, "stride") or None, call.arg(3, "padding", 0),
                   call.arg(4, "dilation", 1), bool(call.arg(5, "ceil_mode", False)))
    low = Lowered(rule, [call.act(0)])
    return (low, None) if call.op in _WITH_INDICES else low  # (values, indices): nothing may use the indices


@handles(aten.avg_pool2d.default, aten.avg_pool1d.default)
def _avg_pool(call: Call) -> Lowered:
    rule = AvgPool(call.arg(1, "kernel_size"), call.arg(2, "stride") or None, call.arg(3, "padding", 0),
                   bool(call.arg(4, "ceil_mode", False)), bool(call.arg(5, "count_include_pad", True)),
                   call.arg(6, "divisor_override"))
    return Lowered(rule, [call.act(0)])


@handles(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default)
def _adaptive_avg_pool(call: Call) -> Lowered:
    x, size = call.act(0), call.arg(1, "output_size")
    sizes = [size] if isinstance(size, int) else list(size)
    if all(s == 1 for s in sizes):
        return Lowered(GlobalAvgPool(), [x])
    return Lowered(AdaptiveAvgPool(size), [x])


_UPSAMPLE = {  # op: (mode, whether its arguments include align_corners, whether it is the .vec overload)
    aten.upsample_nearest2d.vec: ("nearest", False, True), aten.upsample_nearest2d.default: ("nearest", False, False),
    aten.upsample_nearest1d.vec: ("nearest", False, True), aten.upsample_nearest1d.default: ("nearest", False, False),
    aten._upsample_nearest_exact2d.vec: ("nearest-exact", False, True),
    aten._upsample_nearest_exact2d.default: ("nearest-exact", False, False),
    aten._upsample_nearest_exact1d.vec: ("nearest-exact", False, True),
    aten._upsample_nearest_exact1d.default: ("nearest-exact", False, False),
    aten.upsample_bilinear2d.vec: ("linear", True, True), aten.upsample_bilinear2d.default: ("linear", True, False),
    aten.upsample_linear1d.vec: ("linear", True, True), aten.upsample_linear1d.default: ("linear", True, False),
}


@handles(*_UPSAMPLE)
def _upsample(call: Call) -> Lowered:
    mode, has_align, vec = _UPSAMPLE[call.op]
    x = call.act(0)
    nd = len(x.shape) - 1
    if nd not in (1, 2) or call.out_shape is None:
        raise Unsupported(f"upsampling of a {len(x.shape) + 1}-D tensor")
    align = bool(call.arg(2, "align_corners", False)) if has_align else False
    first = 3 if has_align else 2  # where the scales start
    if vec:
        scales = call.arg(first, "scale_factors")
    else:
        names = ["scales"] if nd == 1 else ["scales_h", "scales_w"]
        scales = [call.arg(first + i, key) for i, key in enumerate(names)]
    scales = [None if s is None else float(s) for s in scales] if scales else None
    return Lowered(Upsample(mode, call.out_shape[1:], align, scales), [x])


@handles(aten.adaptive_max_pool2d.default, aten.adaptive_max_pool1d.default)
def _adaptive_max_pool(call: Call):
    x, size = call.act(0), call.arg(1, "output_size")
    sizes = [size] if isinstance(size, int) else list(size)
    sizes = sizes * (len(x.shape) - 1) if len(sizes) == 1 else sizes
    sizes = [n if s is None else int(s) for n, s in zip(x.shape[1:], sizes)]
    if all(s == 1 for s in sizes):
        rule = GlobalMaxPool()
    elif all(n % s == 0 for n, s in zip(x.shape[1:], sizes)):  # equal windows: a plain max pooling
        k = [n // s for n, s in zip(x.shape[1:], sizes)]
        rule = MaxPool(k, k)
    else:
        raise Unsupported(f"adaptive max pooling of {tuple(x.shape[1:])} to {tuple(sizes)} (windows of unequal size)")
    return Lowered(rule, [x]), None  # (values, indices): nothing may use the indices
