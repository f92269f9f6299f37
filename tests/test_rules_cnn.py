"""The CNN rules (general max / average / adaptive pooling, SiLU / Sigmoid / Tanh and their q8 / q4
kept codes, Conv1d, Conv2d with H != W, a per-channel affine on (N, C, L)) against torch autograd
of torch's own ops, and their forward + backward exported to ONNX (run in onnxruntime) and lowered
with torch.export. Rules are driven directly (bind / forward / backward), with no tracer."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from edgetl import rules as R
from edgetl.errors import RecipeError
from edgetl.graph import LeanGraph, Node
from edgetl.lowering import Lowering
from edgetl.optim import OptimizerConfig
from edgetl.prepared import PreparedModel
from edgetl.recipes import PrepareContext, parse_recipe
from edgetl.rules import Need
from edgetl.rules.conv import bias_grad
from helpers import lean_vs_reference, rel_err
from rule_harness import (assert_executorch_runs_like_torch, assert_onnx_runs_like_torch,
                          assert_torch_export_without_scatter, bind, lean_grads, rule_step)

X2 = (2, 3, 9, 7)  # H != W, odd sizes: ceil_mode and floor leave edge windows
X1 = (2, 3, 11)

MAX_POOLS = {  # name: (rule args, input shape, torch reference)
    "resnet_3s2p1": ((3, 2, 1), X2, lambda x: F.max_pool2d(x, 3, 2, 1)),
    "3s2p1_ceil": ((3, 2, 1, 1, True), X2, lambda x: F.max_pool2d(x, 3, 2, 1, 1, True)),
    "2s2_ceil_edge": ((2, 2, 0, 1, True), X2, lambda x: F.max_pool2d(x, 2, 2, 0, 1, True)),
    "ceil_drops_window_in_pad": ((2, 2, 1, 1, True), (2, 3, 5, 7), lambda x: F.max_pool2d(x, 2, 2, 1, 1, True)),
    "2s2_floor_tiles": ((2, 2), X2, lambda x: F.max_pool2d(x, 2, 2)),
    "3s1p1_overlap": ((3, 1, 1), X2, lambda x: F.max_pool2d(x, 3, 1, 1)),
    "dilated": ((3, 2, 0, 2), X2, lambda x: F.max_pool2d(x, 3, 2, 0, 2)),
    "rect": (((2, 3), (1, 2), (1, 1), (2, 1), True), X2,
             lambda x: F.max_pool2d(x, (2, 3), (1, 2), (1, 1), (2, 1), True)),
    "3s3_ceil_tiles": ((3, 3, 0, 1, True), X2, lambda x: F.max_pool2d(x, 3, 3, 0, 1, True)),
    "1d_3s2p1": (([3], [2], [1]), X1, lambda x: F.max_pool1d(x, 3, 2, 1)),
    "1d_2s2_ceil": ((2, 2, 0, 1, True), X1, lambda x: F.max_pool1d(x, 2, 2, 0, 1, True)),
    "1d_dilated": ((3, 1, 1, 2), X1, lambda x: F.max_pool1d(x, 3, 1, 1, 2)),
    "1d_3s3_floor_tiles": (([3], [3]), X1, lambda x: F.max_pool1d(x, 3, 3)),
    "2x3_tiles": (((2, 3), (2, 3)), X2, lambda x: F.max_pool2d(x, (2, 3), (2, 3))),
    "3s3_floor_tiles": ((3, 3), X2, lambda x: F.max_pool2d(x, 3, 3)),
}

AVG_POOLS = {
    "3s2p1": ((3, 2, 1), X2, lambda x: F.avg_pool2d(x, 3, 2, 1)),
    "3s2p1_exclude_pad": ((3, 2, 1, False, False), X2, lambda x: F.avg_pool2d(x, 3, 2, 1, False, False)),
    "3s2p1_ceil": ((3, 2, 1, True), X2, lambda x: F.avg_pool2d(x, 3, 2, 1, True)),
    "3s2p1_ceil_exclude": ((3, 2, 1, True, False), X2, lambda x: F.avg_pool2d(x, 3, 2, 1, True, False)),
    "2s2_ceil_edge": ((2, 2, 0, True), X2, lambda x: F.avg_pool2d(x, 2, 2, 0, True)),
    "ceil_drops_window_in_pad": ((2, 2, 1, True), (2, 3, 5, 7), lambda x: F.avg_pool2d(x, 2, 2, 1, True)),
    "divisor_override": ((3, 2, 1, False, True, 5), X2, lambda x: F.avg_pool2d(x, 3, 2, 1, False, True, 5)),
    "rect": (((2, 3), (1, 2), (1, 1), True, False), X2, lambda x: F.avg_pool2d(x, (2, 3), (1, 2), (1, 1), True, False)),
    "2s2_tiles": ((2, 2), X2, lambda x: F.avg_pool2d(x, 2)),
    "1x2_tiles": (((1, 2), (1, 2)), X2, lambda x: F.avg_pool2d(x, (1, 2))),
    "1d_3s2p1_ceil": (([3], [2], [1], True), X1, lambda x: F.avg_pool1d(x, 3, 2, 1, True)),
    "1d_exclude_pad": ((3, 2, 1, False, False), X1, lambda x: F.avg_pool1d(x, 3, 2, 1, False, False)),
}

ADAPTIVE = {
    "3x2_non_divisible": ((3, 2), X2, lambda x: F.adaptive_avg_pool2d(x, (3, 2))),
    "4x4_upsampling_cols": ((4, 4), (2, 3, 9, 3), lambda x: F.adaptive_avg_pool2d(x, (4, 4))),
    "none_keeps_rows": ((None, 3), X2, lambda x: F.adaptive_avg_pool2d(x, (None, 3))),
    "global": (1, X2, lambda x: F.adaptive_avg_pool2d(x, 1)),
    "1d_non_divisible": (4, X1, lambda x: F.adaptive_avg_pool1d(x, 4)),
    "1d_global": (1, X1, lambda x: F.adaptive_avg_pool1d(x, 1)),
}

SMOOTH = {"silu": (R.SiLU, F.silu), "sigmoid": (R.Sigmoid, torch.sigmoid), "tanh": (R.Tanh, torch.tanh)}


def _check(rule, x, ref, tol: float = 1e-5):
    """Forward and input gradient of the lean rule against torch autograd of `ref`."""
    rule = bind(rule, x)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3))
    yr.backward(g)
    y, gx, _, kept = lean_grads(rule, x, g)
    assert y.shape == yr.shape and rel_err(y, yr) <= tol
    assert gx.shape == x.shape and rel_err(gx, xr.grad) <= tol, rel_err(gx, xr.grad)
    return kept


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def _max_pool_case(case: str):
    """A pool case on inputs full of ties: its bound rule, the input, an output gradient, and torch's output and
    input gradient."""
    args, shape, ref = MAX_POOLS[case]
    x = _ties(shape)
    rule = bind(R.MaxPool(*args), x)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3))
    yr.backward(g)
    return rule, x, g, yr.detach(), xr.grad


@pytest.mark.parametrize("case", list(MAX_POOLS))
def test_max_pool_matches_autograd_and_keeps_a_byte_per_output(case):
    args, shape, ref = MAX_POOLS[case]
    rule = R.MaxPool(*args)
    kept = _check(rule, _x(shape), ref)
    assert list(kept) == ["i"] and kept["i"].dtype == torch.uint8
    assert kept["i"].numel() == ref(_x(shape)).numel()  # one byte per output, never the float input


@pytest.mark.parametrize("case", ["resnet_3s2p1", "3s2p1_ceil", "rect", "1d_3s2p1", "2s2_floor_tiles",
                                  "2x3_tiles", "1d_3s3_floor_tiles", "3s3_floor_tiles"])
def test_max_pool_ties_go_to_the_first_maximum_as_torch(case):
    """ReLU outputs before a pool are full of equal zeros: the gradient must go where torch sends it."""
    args, shape, ref = MAX_POOLS[case]
    x = F.relu(torch.randint(-2, 2, shape, generator=torch.Generator().manual_seed(1)).float())
    _check(R.MaxPool(*args), x, ref, tol=1e-6)  # a misrouted tie is off by a whole g


def test_max_pool_all_equal_window_sends_one_gradient():
    rule = bind(R.MaxPool2d(2), torch.zeros(1, 1, 2, 2))
    y, gx, _, _ = lean_grads(rule, torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 1, 1))
    assert gx.sum() == 1 and gx[0, 0, 0, 0] == 1


class _InArithmetic(dict):
    """A max pool's (empty) tensors under a lowering that writes it in float arithmetic (ExecuTorch's)."""

    lowering = Lowering(max_pool_in_arithmetic=True)

    def __bool__(self):  # RuleStep keeps `w or {}`
        return True


def _ties(shape, seed=1):
    """Post-ReLU integers: windows full of equal maxima (zeros), a few distinct values."""
    x = F.relu(torch.randint(-2, 2, shape, generator=torch.Generator().manual_seed(seed)).float())
    return x + (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.2) * _x(shape, seed)


@pytest.mark.parametrize("case", list(MAX_POOLS))
def test_max_pool_in_arithmetic_sends_ties_to_the_first_maximum(case):
    """`Lowering.max_pool_in_arithmetic` (no bool op): the same pool and input gradient as torch, ties
    included, and the position kept as one int8 per output."""
    rule, x, g, y_ref, gx_ref = _max_pool_case(case)
    need = Need((True,), frozenset())
    y, kept = rule.forward([x], _InArithmetic(), need)
    (gx,), _ = rule.backward(g, dict(kept), _InArithmetic(), need)
    assert kept["i"].dtype == torch.int8 and kept["i"].numel() == y_ref.numel()
    assert torch.equal(y, y_ref)
    assert rel_err(gx, gx_ref) <= 1e-6  # a misrouted tie is off by a whole g; overlaps sum in another order


def test_max_pool_in_arithmetic_runs_in_xnnpack_as_torch():
    """ExecuTorch with XNNPACK runs the arithmetic max pool (disjoint windows with a crop, and the ResNet
    stem's 3x3/s2/p1) entirely in its delegates, no bool op nor strided slice left on ExecuTorch's own
    kernels, and gives torch's pool and input gradient, ties included."""
    import numpy as np

    from edgetl.exporters.executorch import _delegated_ops, _lower
    from edgetl.runtime.backends.executorch import NativeMethod
    from rule_harness import RuleStep, _Steps

    steps, want = [], []
    for case in ("2s2_floor_tiles", "resnet_3s2p1", "1d_3s2p1"):
        rule, x, g, y_ref, gx_ref = _max_pool_case(case)
        steps.append((RuleStep(rule, _InArithmetic()).eval(), x, g))
        want += [y_ref, gx_ref]
    module = _Steps([s for s, _, _ in steps]).eval()
    args = tuple(t for _, x, g in steps for t in (x, g))
    et = _lower(module, args, delegate=True)
    kinds = _delegated_ops(et)["portable_op_kinds"]
    bool_ops = {f"aten::{op}" for op in ("where", "eq", "ne", "gt", "ge", "lt", "le", "logical_and", "bitwise_and")}
    assert not (bool_ops | {"aten::slice_copy", "aten::max_pool2d_with_indices"}) & set(kinds), kinds
    for got, ref in zip(NativeMethod(et.buffer)([a.numpy() for a in args]), want):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args", [(3, 1, 1), (3, 2, 1), (2, 2)])
def test_max_pool_backward_holds_one_tap_gradient_at_a_time(args):
    """The backward's live memory, as the analytic model counts it, stays a few input sizes
    (a stack of all k*k masked tap gradients alone would be 9 output sizes)."""
    from edgetl.memory import Tracker, _Observe

    x = torch.empty(4, 8, 24, 20, device="meta")
    rule = bind(R.MaxPool(*args), x)
    g = torch.empty(4, 8, *rule.out_hw, device="meta")
    idx = torch.empty(g.shape, dtype=torch.uint8, device="meta")
    tracker = Tracker()
    with _Observe(tracker):
        tracker.hold("g", g)
        tracker.hold("i", idx)
        (gx,), _ = rule.backward(g, {"i": idx}, {}, Need((True,), frozenset()))
    inputs = x.numel() * 4
    assert gx.shape == x.shape and tracker.peak < 6 * inputs, tracker.peak / inputs


@pytest.mark.parametrize("case", list(AVG_POOLS))
def test_avg_pool_matches_autograd_and_keeps_nothing(case):
    args, shape, ref = AVG_POOLS[case]
    assert _check(R.AvgPool(*args), _x(shape), ref) == {}


@pytest.mark.parametrize("case", list(ADAPTIVE))
def test_adaptive_avg_pool_matches_autograd(case):
    size, shape, ref = ADAPTIVE[case]
    assert _check(R.AdaptiveAvgPool(size), _x(shape), ref) == {}


def test_legacy_pool_interfaces_still_work():
    x = _x(X2)
    _check(R.MaxPool2d(2), x, lambda t: F.max_pool2d(t, 2))
    _check(R.AvgPool2d(3), x, lambda t: F.avg_pool2d(t, 3))
    _check(R.GlobalAvgPool(), x, lambda t: t.mean((2, 3), keepdim=True))
    _check(R.GlobalAvgPool(), _x(X1), lambda t: t.mean(2, keepdim=True))


@pytest.mark.parametrize("shape", [X2, X1, (4, 6)])
@pytest.mark.parametrize("name", list(SMOOTH))
def test_smooth_activation_matches_autograd_keeping_one_float_tensor(name, shape):
    cls, ref = SMOOTH[name]
    kept = _check(cls(), _x(shape), ref)
    assert list(kept) == ["v"] and kept["v"].dtype == torch.float32 and kept["v"].shape == shape


def test_silu_keeps_its_input_sigmoid_and_tanh_their_output():
    x = _x(X2)
    for cls, expect in ((R.SiLU, x), (R.Sigmoid, torch.sigmoid(x)), (R.Tanh, torch.tanh(x))):
        kept = _check(cls(), x, SMOOTH[cls.kind][1])
        assert torch.equal(kept["v"], expect)


# --- q8 / q4 kept codes -------------------------------------------------------------------------


def _quant(cls, bits):
    rule = cls()
    rule.quant_bits = bits
    return rule


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (4, 5, 9), (16, 5)])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(SMOOTH))
def test_quantized_keep_matches_its_reference_and_is_close_to_exact(name, bits, shape):
    cls, exact = SMOOTH[name]
    x = _x(shape)
    rule = _quant(cls, bits)
    # the lean rule is exactly what its autograd reference (quantize/dequantize round trip) defines
    _check(rule, x, lambda t: rule.reference([t], {}))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    _, gx_exact, _, _ = lean_grads(bind(cls(), x), x, g)
    _, gx, _, kept = lean_grads(bind(rule, x), x, g)
    err = float((gx - gx_exact).norm() / gx_exact.norm())
    low, high = {8: (3e-4, 5e-3), 4: (5e-3, 0.06)}[bits]  # about a code step: coarser, or no rounding, fails
    assert low < err < high, err
    per_channel = (1, 5) + (1,) * (len(shape) - 2)
    assert kept["q"].dtype == torch.uint8 and kept["s"].shape == per_channel and kept["z"].shape == per_channel
    per_sample = x[0].numel()
    assert kept["q"].numel() == shape[0] * -(-per_sample * bits // 8)  # q4: two codes per byte


@pytest.mark.parametrize("name", list(SMOOTH))
def test_q4_is_coarser_than_q8_and_packs_odd_sizes(name):
    cls, _ = SMOOTH[name]
    x = _x((3, 5, 3, 3))  # 45 values per sample: one pad code
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    exact = lean_grads(bind(cls(), x), x, g)[1]
    errs = {b: float((lean_grads(bind(_quant(cls, b), x), x, g)[1] - exact).norm() / exact.norm()) for b in (8, 4)}
    assert 0 < errs[8] < errs[4]
    assert lean_grads(bind(_quant(cls, 4), x), x, g)[3]["q"].shape == (3, 23)


def test_quantized_keep_is_per_channel():
    """A channel of tiny values next to one of huge values keeps its own precision."""
    x = _x((2, 2, 8, 8))
    x[:, 0] *= 1e-3
    x[:, 1] *= 1e3
    rule = bind(_quant(R.Tanh, 8), x * 0 + torch.tanh(x))
    g = torch.ones_like(x)
    _, gx, _, _ = lean_grads(bind(_quant(R.SiLU, 8), x), x, g)
    exact = lean_grads(bind(R.SiLU(), x), x, g)[1]
    small = (gx[:, 0] - exact[:, 0]).abs().max() / exact[:, 0].abs().max()
    assert small < 1e-2
    del rule


# --- convolutions and the affine -----------------------------------------------------------------

CONV1D = {  # name: (rule args, torch conv1d kwargs, Cin, Cout, groups)
    "k3s2p1": ((3, 2, 1), dict(stride=2, padding=1), 4, 6, 1),
    "dilated": ((3, 1, 2, 2), dict(padding=2, dilation=2), 4, 6, 1),
    "depthwise": ((5, 1, 2, 1, 4), dict(padding=2, groups=4), 4, 4, 4),
    "grouped_s3": ((3, 3, 0, 1, 2), dict(stride=3, groups=2), 4, 6, 2),
    "pointwise": ((1,), dict(), 4, 6, 1),
}


@pytest.mark.parametrize("case", list(CONV1D))
def test_conv1d_matches_autograd(case):
    args, kw, cin, cout, groups = CONV1D[case]
    x = _x((3, cin, 13))
    wt = _x((cout, cin // groups, args[0]), 1) * 0.3
    b = _x((cout,), 2)
    _conv_parity(R.Conv1d(*args), x, wt, b, lambda x, w, b: F.conv1d(x, w, b, **kw))


def test_conv1d_asymmetric_padding():
    x, wt, b = _x((2, 3, 10)), _x((4, 3, 4), 1), _x((4,), 2)
    _conv_parity(R.Conv1d(4, 1, (1, 2)), x, wt, b, lambda x, w, b: F.conv1d(F.pad(x, (1, 2)), w, b))
    _conv_parity(R.Conv1d(4, 2, (2, 1)), x, wt, b, lambda x, w, b: F.conv1d(F.pad(x, (2, 1)), w, b, stride=2))


CONV2D_HW = {
    "3x3s2p1": ((3, 2, 1), dict(stride=2, padding=1), 1),
    "5x3_rect_s21": (((5, 3), (2, 1), (2, 1)), dict(stride=(2, 1), padding=(2, 1)), 1),
    "depthwise_s2": ((3, 2, 1, 1, 4), dict(stride=2, padding=1, groups=4), 4),
    "dilated_s1": ((3, 1, 2, 2), dict(padding=2, dilation=2), 1),
}


@pytest.mark.parametrize("case", list(CONV2D_HW))
def test_conv2d_with_unequal_height_and_width(case):
    args, kw, groups = CONV2D_HW[case]
    k = args[0] if isinstance(args[0], tuple) else (args[0], args[0])
    x, wt, b = _x((2, 4, 11, 6)), _x((4, 4 // groups, *k), 1) * 0.3, _x((4,), 2)
    _conv_parity(R.Conv2d(*args), x, wt, b, lambda x, w, b: F.conv2d(x, w, b, **kw))


@pytest.mark.parametrize("pads,k,s,groups", [((0, 1, 0, 1), 3, 2, 4), ((1, 2, 1, 2), 5, 2, 1), ((0, 2, 1, 1), 3, 3, 1),
                                              ((2, 0, 0, 1), 3, 2, 1)])
def test_conv2d_asymmetric_padding(pads, k, s, groups):
    """TF-same padding and others (unequal pads before and after): gradients match autograd's."""
    t, b_, l, r = pads
    x, wt, b = _x((2, 4, 11, 6)), _x((4, 4 // groups, k, k), 1) * 0.3, _x((4,), 2)
    _conv_parity(R.Conv2d(k, s, pads, 1, groups), x, wt, b,
                 lambda x, w, b: F.conv2d(F.pad(x, (l, r, t, b_)), w, b, stride=s, groups=groups))


def _conv_parity(rule, x, wt, b, ref):
    rule = bind(rule, x, {"weight": wt, "bias": b})
    leaves = [t.clone().requires_grad_(True) for t in (x, wt, b)]
    yr = ref(*leaves)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(g)
    y, gx, gp, _ = lean_grads(rule, x, g, {"weight": wt, "bias": b}, frozenset({"weight", "bias"}))
    assert rel_err(y, yr) < 1e-5
    assert gx.shape == x.shape and rel_err(gx, leaves[0].grad) < 1e-5
    assert gp["weight"].shape == wt.shape and rel_err(gp["weight"], leaves[1].grad) < 1e-5
    assert rel_err(gp["bias"], leaves[2].grad) < 1e-5


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 9), (3, 4, 5, 6)])
def test_affine_on_any_rank(shape):
    x, wt, b = _x(shape), _x((4,), 1), _x((4,), 2)
    per_c = (1, 4) + (1,) * (len(shape) - 2)
    _conv_parity(R.Affine(), x, wt, b, lambda x, w, b: x * w.reshape(per_c) + b.reshape(per_c))


# --- recipes: mask + q8 on a squeeze-excite CNN built by hand --------------------------------------

def se_cnn(recipe: str, input_shape=(3, 10, 7)) -> PreparedModel:
    """conv-SiLU, depthwise conv-SiLU, a squeeze-excite gate (SiLU, Sigmoid), conv-ReLU,
    max pool 3/2/1, conv-Tanh, adaptive pool to a non-divisible 2x3... head. Frozen weights fp32."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}

    def conv(name, rule, cin, cout, k, groups=1):
        fan_in = cin // groups * k * k
        tensors[f"{name}.weight"] = torch.randn(cout, cin // groups, k, k, generator=g) * (2.0 / fan_in) ** 0.5
        tensors[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.1
        return Node(name, rule, [], name, {"weight": f"{name}.weight", "bias": f"{name}.bias"})

    nodes = [
        conv("stem", R.Conv2d(3, 1, 1), 3, 8, 3), Node("act0", R.SiLU(), []),
        conv("dw", R.Conv2d(3, 1, 1, 1, 8), 8, 8, 3, 8), Node("act1", R.SiLU(), []),
        Node("se_pool", R.GlobalAvgPool(), []), conv("se_fc1", R.Conv2d(1), 8, 4, 1), Node("se_act", R.SiLU(), []),
        conv("se_fc2", R.Conv2d(1), 4, 8, 1), Node("gate", R.Sigmoid(), []),
        Node("se_mul", R.Mul(), ["act1", "gate"]),
        conv("pw", R.Conv2d(1), 8, 8, 1), Node("relu", R.ReLU(), []),
        Node("pool", R.MaxPool(3, 2, 1), []),
        conv("pw2", R.Conv2d(1), 8, 8, 1), Node("tanh", R.Tanh(), []),
        Node("apool", R.AdaptiveAvgPool((2, 3)), []), Node("flat", R.Flatten(), []),
    ]
    prev = "input"
    for n in nodes:
        n.inputs = n.inputs or [prev]
        prev = n.name
    tensors["head.weight"] = torch.randn(4, 48, generator=g) * 0.1
    tensors["head.bias"] = torch.zeros(4)
    nodes.append(Node("head", R.Linear(), ["flat"], "head", {"weight": "head.weight", "bias": "head.bias"}))
    return _prepared(nodes, tensors, input_shape, recipe, "fp32")


def _prepared(nodes, tensors, input_shape, recipe: str, frozen_dtype: str) -> PreparedModel:
    """What prepare() does after tracing: recipe parts, head, modifiers, shapes, frozen storage."""
    from edgetl.quant import quantize_per_channel

    graph = LeanGraph(nodes, input_shape, tensors, "head", "flat", frozen_dtype=frozen_dtype)
    rec = parse_recipe(recipe)
    ctx = PrepareContext(head="head", backbone_params=graph.total_params())
    for part in rec.ordered():
        if part.kind == "part":
            part.apply(graph, ctx)
    graph.trainable += ["head.weight", "head.bias"]
    for part in rec.ordered():
        if part.kind == "modifier":
            part.apply(graph, ctx)
    graph.infer_shapes()
    stored = {t: quantize_per_channel(v) if graph.is_quantized(t) else (v,)
              for t, v in tensors.items() if t not in graph.trainable}
    c = input_shape[0]
    return PreparedModel(graph, rec, "handmade", 4, (0.0,) * c, (1.0,) * c, "head", ctx.notes, 0, stored)


def kws_cnn(recipe: str, input_shape=(5, 24)) -> PreparedModel:
    """A keyword-spotting-like 1-D CNN: Conv1d, a standalone per-channel affine (BatchNorm1d after
    an add), ReLU, max pool 3/2/1, grouped Conv1d, SiLU, average pool with ceil_mode, adaptive
    pool to a non-divisible 3, head. Frozen weights int8."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}

    def layer(name, rule, shape_w, inputs=None, std=0.3):
        tensors[f"{name}.weight"] = torch.randn(*shape_w, generator=g) * std
        tensors[f"{name}.bias"] = torch.randn(shape_w[0], generator=g) * 0.1
        return Node(name, rule, inputs or [], name, {"weight": f"{name}.weight", "bias": f"{name}.bias"})

    nodes = [
        layer("c1", R.Conv1d(5, 1, 2), (8, 5, 5)), layer("c2", R.Conv1d(3, 1, 1), (8, 8, 3)),
        Node("add", R.Add(), ["c1", "c2"]), layer("bn", R.Affine(), (8,), std=1.0), Node("relu", R.ReLU(), []),
        Node("pool", R.MaxPool([3], [2], [1]), []), layer("c3", R.Conv1d(3, 2, 1, 1, 2), (12, 4, 3)),
        Node("silu", R.SiLU(), []), Node("avg", R.AvgPool([2], [2], [0], True), []),
        Node("apool", R.AdaptiveAvgPool(3), []), Node("flat", R.Flatten(), []),
    ]
    prev = "input"
    for n in nodes:
        n.inputs = n.inputs or [prev]
        prev = n.name
    nodes[1].inputs = ["c1"]
    tensors["head.weight"] = torch.randn(4, 36, generator=g) * 0.1
    tensors["head.bias"] = torch.zeros(4)
    nodes.append(Node("head", R.Linear(), ["flat"], "head", {"weight": "head.weight", "bias": "head.bias"}))
    return _prepared(nodes, tensors, input_shape, recipe, "int8")


def _batch(pm, n=6):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, *pm.graph.input_shape, generator=g) * 2, torch.arange(n) % 4


def test_bias_mask_q8_quantizes_the_smooth_keeps_and_masks_the_relu():
    pm = se_cnn("bias+mask+q8")
    rules = {n.name: n.rule for n in pm.graph.nodes}
    assert all(rules[a].quant_bits == 8 for a in ("act0", "act1", "se_act", "gate", "tanh"))
    assert rules["relu"].mask
    assert pm.notes["quantized_keeps"] == {"bits": 8, "layers": 5}
    kept = {(k.node, k.name): k.dtype for k in pm.memory(6).kept}
    assert kept[("relu", "m")] == "bool"
    for a in ("act0", "act1", "se_act", "gate", "tanh"):
        assert (kept[(a, "q")], kept[(a, "s")], kept[(a, "z")]) == ("uint8", "float32", "float32")
        assert (a, "v") not in kept


def test_mask_leaves_smooth_activations_exact():
    pm = se_cnn("bias+mask")
    smooth = [n.rule for n in pm.graph.nodes if n.name in ("act0", "act1", "se_act", "gate", "tanh")]
    assert all(r.quant_bits is None and not r.approximate for r in smooth)
    assert {k.dtype for k in pm.memory(6).kept if k.node in ("act0", "gate", "tanh")} == {"float32"}


def test_q8_and_q4_together_are_refused():
    with pytest.raises(RecipeError, match="q8.*q4|q4.*q8"):
        se_cnn("bias+q8+q4")


@pytest.mark.parametrize("recipe", ["bias+mask", "full", "bias+mask+q8", "full+q4"])
@pytest.mark.parametrize("model", ["se_cnn", "kws_cnn"])
def test_cnn_step_matches_its_autograd_reference(model, recipe):
    pm = {"se_cnn": se_cnn, "kws_cnn": kws_cnn}[model](recipe)
    x, y = _batch(pm)
    gerr, perr = lean_vs_reference(pm, x, y, OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < 1e-5


def bias_grad_errors(bits: int) -> dict[str, float]:
    """Relative error (L2) of each bias gradient of bias+mask+q{bits} against exact bias+mask."""
    exact, quant = se_cnn("bias+mask"), se_cnn(f"bias+mask+q{bits}")
    x, y = _batch(exact, 16)
    grads = []
    for pm in (exact, quant):
        prog = pm.program()
        grads.append(prog.loss_and_grads(x, y, pm.initial_params())[2])
    return {t: float((grads[1][t] - grads[0][t]).norm() / grads[0][t].norm()) for t in grads[0] if t.endswith("bias")}


def test_quantized_keeps_change_bias_gradients_a_little():
    e8, e4 = bias_grad_errors(8), bias_grad_errors(4)
    assert e8["head.bias"] == 0.0  # nothing quantized after the last layer that trains it
    inner8 = [v for t, v in e8.items() if t != "head.bias"]
    inner4 = [v for t, v in e4.items() if t != "head.bias"]
    assert 0 < max(inner8) < 0.01, e8
    assert 0 < max(inner4) < 0.12, e4
    assert max(inner8) < max(inner4)


def test_quantized_keeps_shrink_kept_memory():
    smooth = ("act0", "act1", "se_act", "gate", "tanh")
    kept = {b: sum(k.bytes for k in se_cnn(f"bias+mask{b}").memory(8).kept if k.node in smooth)
            for b in ("", "+q8", "+q4")}
    assert kept["+q8"] < kept[""] * 0.3 and kept["+q4"] < kept[""] * 0.16, kept


# --- exportability -------------------------------------------------------------------------------

def _export_cases():
    cases = {f"max_{k}": (lambda a=a: R.MaxPool(*a), s) for k, (a, s, _) in MAX_POOLS.items()}
    cases |= {f"avg_{k}": (lambda a=a: R.AvgPool(*a), s) for k, (a, s, _) in AVG_POOLS.items()}
    cases |= {f"adaptive_{k}": (lambda a=a: R.AdaptiveAvgPool(a), s) for k, (a, s, _) in ADAPTIVE.items()}
    for name, (cls, _) in SMOOTH.items():
        cases[name] = (cls, X2)
        for bits in (8, 4):
            cases[f"{name}_q{bits}"] = (lambda cls=cls, bits=bits: _quant(cls, bits), (2, 3, 3, 3))
    cases["silu_q4_1d_odd"] = (lambda: _quant(R.SiLU, 4), (2, 3, 5))
    cases["sigmoid_q8_features"] = (lambda: _quant(R.Sigmoid, 8), (2, 6))
    conv_w = {"weight": _x((6, 2, 3), 1), "bias": _x((6,), 2)}
    cases["conv1d_k3s2p1_grouped"] = (lambda: R.Conv1d(3, 2, 1, 1, 2), (2, 4, 11), conv_w)
    cases["affine_1d"] = (R.Affine, (2, 4, 11), {"weight": _x((4,), 1), "bias": _x((4,), 2)})
    return cases


EXPORT_CASES = _export_cases()


def _rule_step(case):
    make, shape, *w = EXPORT_CASES[case]
    return rule_step(make(), _x(shape), w[0] if w else {})


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_rule_exports_to_onnx_and_runs_in_onnxruntime(case):
    assert_onnx_runs_like_torch(*_rule_step(case), y_atol=1e-6, gx_atol=1e-5)


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_rule_lowers_with_torch_export_without_scatter(case):
    assert_torch_export_without_scatter(*_rule_step(case), y_atol=1e-8, gx_atol=1e-6)


@pytest.mark.parametrize("model", ["se_cnn", "kws_cnn"])
def test_cnn_step_exports_to_onnx_and_matches_the_torch_step(model, tmp_path):
    """The whole hand-built CNN with bias+mask+q8, as the `onnx` target exports it."""
    from edgetl.exporters.onnx import export_onnx

    from edgetl.exporters.onnx import LOWERING, _export, onnx_names
    from edgetl.step import LeanStep

    pm = {"se_cnn": se_cnn, "kws_cnn": kws_cnn}[model]("bias+mask+q8")
    opt = OptimizerConfig.make("sgd", lr=0.1)
    x, y = _batch(pm)
    params = pm.initial_params()
    step = pm.step_module(opt)
    state = step.init_state(params)
    flat = [params[t].numpy() for t in pm.trainable] + [state[k].numpy() for k in opt.state_names(pm.trainable)]
    if len(pm.graph.input_shape) == 3:
        export_onnx(pm, opt, 6, tmp_path)
    else:  # export_onnx (and memory, the runtime's input checks) still assume (C, H, W) inputs
        pnames, snames = onnx_names(pm, opt)
        args = (x, y, torch.tensor(0.1), *map(torch.from_numpy, flat))
        _export(LeanStep(pm, opt, LOWERING).eval(), args, ["x", "y", "lr", *pnames, *snames],
                ["loss", "logits", *(f"new_{n}" for n in pnames + snames)], tmp_path / "train_step.onnx")
    sess = ort.InferenceSession(str(tmp_path / "train_step.onnx"))
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, dict(zip(names, [x.numpy(), y.numpy(), np.array(0.1, np.float32), *flat])))
    loss, logits, new, _, _ = step.run(x, y, 0.1, params, state)
    assert abs(out[0] - float(loss)) < 1e-5
    for i, t in enumerate(pm.trainable):
        np.testing.assert_allclose(out[2 + i], new[t].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rules_run_as_one_executorch_program(tmp_path):
    """Max pooling (2-D, 1-D ceil), average pooling (ceil, excluded padding), adaptive pooling and
    q8/q4 keeps lowered to ExecuTorch (its own kernels) and run by its C++ runtime."""
    pytest.importorskip("executorch")
    cases = ["max_resnet_3s2p1", "max_1d_2s2_ceil", "max_2s2_floor_tiles", "max_1d_3s3_floor_tiles",
             "avg_3s2p1_ceil_exclude", "adaptive_3x2_non_divisible",
             "sigmoid_q8", "silu_q4", "tanh"]
    assert_executorch_runs_like_torch([_rule_step(c) for c in cases], tmp_path / "rules.pte")


# --- conv weight gradients: each form (swapped-batch conv, batched 1x1 matmul, per-tap matmuls) ----

CONV_WEIGHT_GRADS = {  # name: (rule args, Cin, Cout, (H, W)) -- the weight gradient's form in brackets
    "dense_3x3s1p1": ((3, 1, 1), 4, 6, (9, 7)),  # [conv]
    "dense_3x3s2p1_even": ((3, 2, 1), 4, 6, (10, 8)),  # [conv] the far pad trimmed to what the last tap reads
    "dense_3x3s1p1_wide": ((3, 1, 1), 12, 6, (6, 5)),  # [conv] ExecuTorch: a matmul per tap (Cin > 8)
    "tf_same_s2": ((5, 2, (1, 2, 1, 2)), 3, 6, (10, 10)),  # [conv] asymmetric pads, folded into the Conv
    "crop_s3": ((3, 3, 0), 4, 4, (11, 10)),  # [conv] rows no tap reads: a negative pad crops them
    "depthwise_k5s1p2": ((5, 1, 2, 1, 4), 4, 4, (9, 7)),  # [conv]
    "depthwise_k3s1p1": ((3, 1, 1, 1, 4), 4, 4, (8, 7)),  # [conv]
    "depthwise_s2": ((3, 2, 1, 1, 4), 4, 4, (10, 9)),  # [conv]
    "depthwise_multiplier": ((3, 2, 1, 1, 3), 3, 6, (9, 9)),  # [conv]
    "grouped_rect": (((3, 2), (2, 1), (1, 0), 1, 2), 4, 6, (9, 7)),  # [conv]
    "dilated": ((3, 1, 2, 2), 4, 4, (9, 8)),  # [conv]
    "dilated_strided_grouped": ((3, 2, 2, 2, 2), 4, 4, (11, 9)),  # [conv]
    "pointwise": ((1,), 4, 6, (5, 4)),  # [batched matmul]
    "pointwise_wide": ((1,), 24, 32, (2, 2)),  # [one tap] channels dwarf positions
    "pointwise_s2": ((1, 2), 4, 6, (7, 6)),  # [one tap]
    "pointwise_grouped": ((1, 1, 0, 1, 2), 4, 6, (5, 4)),  # [one tap]
}


def _autograd_weight_grad(rule, x, wt, g):
    t, b, l, r = rule.pads
    w = wt.clone().requires_grad_(True)
    F.conv2d(F.pad(x, (l, r, t, b)), w, None, rule.stride, 0, rule.dilation, rule.groups).backward(g)
    return w.grad


class _WeightGrad(torch.nn.Module):
    """(x, g) -> the rule's weight gradient, as the lean step computes it."""

    def __init__(self, rule, wt):
        super().__init__()
        self.rule, self.wt = rule, wt

    def forward(self, x, g):
        return self.rule.backward(g, {"x": x}, {"weight": self.wt}, Need((False,), frozenset({"weight"})))[1]["weight"]


def _weight_grad_case(case):
    """(rule bound to x, weight, bias, x, g, autograd's weight gradient) of one CONV_WEIGHT_GRADS case."""
    args, cin, cout, hw = CONV_WEIGHT_GRADS[case]
    rule = R.Conv2d(*args)
    x, wt, b = _x((3, cin, *hw)), _x((cout, cin // rule.groups, *rule.kernel), 1) * 0.3, _x((cout,), 2)
    rule = bind(rule, x, {"weight": wt, "bias": b})
    g = torch.randn(rule.compute([x], {"weight": wt}).shape, generator=torch.Generator().manual_seed(4))
    return rule, wt, b, x, g, _autograd_weight_grad(rule, x, wt, g)


@pytest.mark.parametrize("case", list(CONV_WEIGHT_GRADS))
def test_conv_weight_gradient_matches_autograd_in_torch_and_onnxruntime(case):
    import onnx

    from exporters.onnx_passes import fuse_pad_into_conv

    rule, wt, b, x, g, ref = _weight_grad_case(case)
    _, _, gp, _ = lean_grads(rule, x, g, {"weight": wt, "bias": b}, frozenset({"weight"}))
    assert gp["weight"].shape == wt.shape and rel_err(gp["weight"], ref) < 1e-5

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_WeightGrad(rule, wt), (x, g), buf, input_names=["x", "g"], output_names=["dw"],
                          opset_version=17, do_constant_folding=False, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    fuse_pad_into_conv(model)  # as the onnx exporter does
    assert "Pad" not in {n.op_type for n in model.graph.node}  # zero pads live in the Conv, crops are slices
    sess = ort.InferenceSession(model.SerializeToString())
    (dw,) = sess.run(None, {"x": x.numpy(), "g": g.numpy()})
    assert rel_err(torch.from_numpy(dw), ref) < 1e-5


# --- conv input gradients with asymmetric pads: the crop lives in the ConvTranspose's pads ---------

CONV_ASYMMETRIC_INPUT_GRADS = {  # name: (rule args, Cin, Cout, (H, W))
    "tf_same_k3s2_depthwise": ((3, 2, (0, 1, 0, 1), 1, 4), 4, 4, (10, 10)),
    "tf_same_k5s2_depthwise_odd": ((5, 2, (1, 2, 1, 2), 1, 4), 4, 4, (11, 9)),  # an output padding as well
    "rect_grouped": (((3, 5), 2, (1, 0, 2, 1), 1, 2), 4, 6, (9, 8)),  # unequal crops per axis
}


@pytest.mark.parametrize("case", list(CONV_ASYMMETRIC_INPUT_GRADS))
def test_conv_input_gradient_with_asymmetric_pads_is_one_convtranspose_in_onnxruntime(case):
    import onnx

    from exporters.onnx_passes import crop_into_conv_transpose

    args, cin, cout, hw = CONV_ASYMMETRIC_INPUT_GRADS[case]
    rule = R.Conv2d(*args)
    x, wt = _x((2, cin, *hw)), _x((cout, cin // rule.groups, *rule.kernel), 1) * 0.3
    rule = bind(rule, x, {"weight": wt})
    g = torch.randn(rule.compute([x], {"weight": wt}).shape, generator=torch.Generator().manual_seed(4))
    t, b, l, r = rule.pads
    xr = x.clone().requires_grad_(True)
    F.conv2d(F.pad(xr, (l, r, t, b)), wt, None, rule.stride, 0, rule.dilation, rule.groups).backward(g)

    class InputGrad(torch.nn.Module):
        def forward(self, g):
            return rule.backward(g, {}, {"weight": wt}, Need((True,), frozenset()))[0][0]

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(InputGrad(), (g,), buf, input_names=["g"], output_names=["gx"], opset_version=17,
                          do_constant_folding=False, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    assert crop_into_conv_transpose(model) == 1  # as the onnx exporter does
    assert [n.op_type for n in model.graph.node if n.op_type in ("ConvTranspose", "Slice")] == ["ConvTranspose"]
    (gx,) = ort.InferenceSession(model.SerializeToString()).run(None, {"g": g.numpy()})
    assert rel_err(torch.from_numpy(gx), xr.grad) < 1e-5


def test_conv_weight_gradient_that_crops_runs_in_executorch(tmp_path):
    """A stride that leaves the last rows unread (SqueezeNet's 3x3/s2 stem on 32x32) crops them before
    the swapped-batch conv: a negative pad there made ExecuTorch's pad kernel fail the `full` step."""
    pytest.importorskip("executorch")
    from edgetl.exporters.executorch import _lower
    from edgetl.runtime.backends.executorch import NativeMethod

    rule, wt, _, x, g, ref = _weight_grad_case("crop_s3")
    path = tmp_path / "dw.pte"
    path.write_bytes(_lower(_WeightGrad(rule, wt).eval(), (x, g), delegate=False).buffer)
    (dw,) = NativeMethod(path)([x.numpy(), g.numpy()])
    assert rel_err(torch.from_numpy(dw), ref) < 1e-5


# --- asymmetric pads as ExecuTorch's lowering asks: no pad op, no crop ------------------------------

class _ExecuTorchLowered(dict):
    """A node's tensors carrying the lowering options ExecuTorch's XNNPACK needs for asymmetric pads."""
    lowering = Lowering(pads_in_kernel=True, shifted_strided_input_grad=True)

    def trainable(self, role: str) -> bool:
        return False


# name: (rule args, Cin, Cout, (H, W)): kernels, strides, dilations, pads before < or > after, an even and an odd size
PADS_AS_ET = CONV_ASYMMETRIC_INPUT_GRADS | {
    f"k{k}s{s}d{d}p{''.join(map(str, pads))}_{h}x{w}": ((k, s, pads, d, 2), 2, 4, (h, w))
    for k in (1, 3, 4, 5) for s in (1, 2, 3) for d in (1, 2)
    for pads in ((0, 1, 0, 1), (1, 2, 0, 0), (2, 0, 1, 3), (0, 3, 2, 1)) for h, w in ((10, 13),)}


@pytest.mark.parametrize("case", list(PADS_AS_ET))
def test_conv_with_asymmetric_pads_lowered_for_executorch_matches_autograd(case):
    """ExecuTorch's lowering: an asymmetrically padded conv as a symmetric one with zero kernel taps
    (`pads_in_kernel`), its input gradient as one ConvTranspose over the gradient shifted by zero rows
    (`shifted_strided_input_grad`) where their limits allow; both exact against autograd."""
    args, cin, cout, hw = PADS_AS_ET[case]
    rule = R.Conv2d(*args)
    x, wt = _x((2, cin, *hw)), _x((cout, cin // rule.groups, *rule.kernel), 1) * 0.3
    t, b, l, r = rule.pads
    rule = bind(rule, x, {"weight": wt})
    xr = x.clone().requires_grad_(True)
    yr = F.conv2d(F.pad(xr, (l, r, t, b)), wt, None, rule.stride, 0, rule.dilation, rule.groups)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(g)
    w = _ExecuTorchLowered(weight=wt)
    assert rel_err(rule.compute([x], w), yr) < 1e-5
    gx = rule.backward(g, {}, w, Need((True,), frozenset()))[0][0]
    assert gx.shape == x.shape and rel_err(gx, xr.grad) < 1e-5


@pytest.mark.parametrize("case", [c for c in CONV_ASYMMETRIC_INPUT_GRADS if c.startswith("tf_same")])
def test_tf_same_conv_lowered_for_executorch_has_no_pad_and_no_crop(case):
    """TF-same pads (before <= after): the forward is one conv (no pad: run NCHW beside the conv's
    channels-last copy, it sized XNNPACK's workspace) and the input gradient one ConvTranspose over the
    zero-row-shifted gradient (no crop: its copy beside the larger result did too); BENCHMARKS.md, task U.
    (rect_grouped, 1 before and 0 after, would need an output padding of 2, not below the stride: it
    keeps its crop.)"""
    args, cin, cout, hw = CONV_ASYMMETRIC_INPUT_GRADS[case]
    rule = R.Conv2d(*args)
    x, wt = _x((2, cin, *hw)), _x((cout, cin // rule.groups, *rule.kernel), 1) * 0.3
    rule = bind(rule, x, {"weight": wt})
    w = _ExecuTorchLowered(weight=wt)
    g = torch.randn(rule.compute([x], w).shape, generator=torch.Generator().manual_seed(4))

    class ForwardBackward(torch.nn.Module):
        def forward(self, x, g):
            return rule.compute([x], w), rule.backward(g, {}, w, Need((True,), frozenset()))[0][0]

    nodes = [n for n in torch.export.export(ForwardBackward(), (x, g), strict=False).graph.nodes
             if n.op == "call_function"]
    ops = [str(n.target) for n in nodes]
    assert sum("conv" in o for o in ops) == 2 and not any("slice" in o for o in ops), ops
    # pads left: of the kernel (a constant, folded at export) and of the small gradient, never of x
    assert not any("pad" in str(n.target) and n.args[0].name == "x" for n in nodes), ops


class _Delegated(_ExecuTorchLowered):
    """A node's frozen tensors under the executorch target's own (XNNPACK) lowering."""

    @property
    def lowering(self):
        from edgetl.exporters.executorch import DELEGATED

        return DELEGATED


class _ConvKernels(TorchDispatchMode):
    """The (kh, kw) kernels of the convolutions run inside the block, and whether a pad op ran."""

    def __enter__(self):
        self.kernels, self.padded = [], False
        super().__enter__()
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.kernels.append(tuple(args[1].shape[2:]))
        self.padded |= "pad" in str(func) and args[0].dim() == 4 and args[0].shape[1] == 4  # x, not the kernel
        return func(*args, **(kwargs or {}))


# (kernel, (H, W)): TF-same stride-2 depthwise convs, even sizes (pads before < after) and odd ones (symmetric)
TF_SAME_DEPTHWISE = {"k3_even": (3, (12, 10)), "k5_even": (5, (12, 10)), "k3_odd": (3, (11, 9)),
                     "k5_odd": (5, (11, 9)), "k5_even_odd": (5, (12, 9))}


def _tf_same_pads(k: int, size: int, s: int = 2) -> tuple[int, int]:
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("case", list(TF_SAME_DEPTHWISE))
def test_tf_same_depthwise_conv_under_executorch_lowering_keeps_within_xnnpack_one_pass_taps(case):
    """The executorch target's forward of a TF-same stride-2 depthwise conv: a 3x3 kernel padded in the
    kernel (4x4: within XNNPACK's 25-tap one-pass depthwise kernels), a 5x5 one behind an explicit pad (6x6
    ran the multipass kernel, 2-4.5x slower; BENCHMARKS.md, task E); forward and input gradient exact."""
    k, (h, wd) = TF_SAME_DEPTHWISE[case]
    (t, b), (l, r) = _tf_same_pads(k, h), _tf_same_pads(k, wd)
    rule, x, wt = R.Conv2d(k, 2, (t, b, l, r), 1, 4), _x((2, 4, h, wd)), _x((4, 1, k, k), 1) * 0.3
    rule = bind(rule, x, {"weight": wt})
    xr = x.clone().requires_grad_(True)
    yr = F.conv2d(F.pad(xr, (l, r, t, b)), wt, None, 2, 0, 1, 4)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(g)
    w = _Delegated(weight=wt)
    with _ConvKernels() as seen:
        y = rule.compute([x], w)
    assert rel_err(y, yr) < 1e-5
    (kernel,) = seen.kernels
    assert kernel[0] * kernel[1] <= 25, kernel
    assert seen.padded == (k == 5 and not rule.symmetric), (seen.padded, kernel)
    gx = rule.backward(g, {}, w, Need((True,), frozenset()))[0][0]
    assert gx.shape == x.shape and rel_err(gx, xr.grad) < 1e-5


class _FrozenForwards(torch.nn.Module):
    """(x per case) -> each case's forward under the executorch target's lowering, the kernel a constant."""

    def __init__(self, rules, kernels):
        super().__init__()
        self.rules = rules
        for i, k in enumerate(kernels):
            self.register_buffer(f"k{i}", k)

    def forward(self, *xs):
        return tuple(rule.compute([x], _Delegated(weight=getattr(self, f"k{i}")))
                     for i, (rule, x) in enumerate(zip(self.rules, xs)))


@pytest.mark.slow
def test_tf_same_depthwise_forwards_run_in_xnnpack_with_int8_storable_kernels(tmp_path):
    """Lowered with XNNPACK: the explicit pad of a 5x5 kernel's input runs inside the delegate (no portable
    op), the results match torch, and each kernel blob is exactly int8 per channel (the bundle stores it so)."""
    pytest.importorskip("executorch")

    cases, c = ["k3_even", "k5_even", "k5_odd"], 16
    rules, kernels, xs, want = [], [], [], []
    for i, case in enumerate(cases):
        k, (h, wd) = TF_SAME_DEPTHWISE[case]
        (t, b), (l, r) = _tf_same_pads(k, h), _tf_same_pads(k, wd)
        x, wt = _x((2, c, h, wd), i), _int8_depthwise_kernel(c, k, i)
        rules.append(bind(R.Conv2d(k, 2, (t, b, l, r), 1, c), x, {"weight": wt}))
        kernels, xs = kernels + [wt], xs + [x]
        want.append(F.conv2d(F.pad(x, (l, r, t, b)), wt, None, 2, 0, 1, c))
    _check_xnnpack_only_int8_kernels(_FrozenForwards(rules, kernels), xs, want, cases, c, tmp_path / "y.pte")


def _int8_depthwise_kernel(c: int, k: int, seed: int) -> torch.Tensor:
    """A (c, 1, k, k) depthwise kernel of int8 values times per-channel scales; each channel's scale is its
    largest magnitude / 127, as quantized weights have."""
    scale = torch.rand(c, 1, 1, 1, generator=torch.Generator().manual_seed(seed)) * 0.02 + 0.01
    q = torch.randint(-127, 128, (c, 1, k, k), generator=torch.Generator().manual_seed(seed)).float()
    q[:, 0, 0, 0] = 127
    return q * scale


def _check_xnnpack_only_int8_kernels(module, inputs, want, cases, channels: int, path) -> None:
    """Lowered with XNNPACK: no portable op, each case's kernel storable as int8 per channel, and each output as
    torch's."""
    from edgetl.exporters.executorch import _delegated_ops, _lower
    from edgetl.runtime.backends.executorch import NativeMethod
    from edgetl.runtime.backends.executorch_q8 import _encode_blob

    et = _lower(module.eval(), tuple(inputs), delegate=True)
    ops = _delegated_ops(et)
    assert ops["portable_ops"] == 0 and ops["delegate_calls"] >= 1, ops
    blobs = [bytes(b) for b in et._named_data.buffers if len(bytes(b)) >= 256]  # the kernels
    assert len(blobs) == len(cases) and all(_encode_blob(b, {channels}) is not None for b in blobs)
    path.write_bytes(et.buffer)
    for case, got, ref in zip(cases, NativeMethod(path)([t.numpy() for t in inputs]), want):
        assert rel_err(torch.from_numpy(got), ref) < 1e-5, case


# --- strided depthwise input gradients as a stride-1 conv over the zero-inserted gradient (ExecuTorch) ----

class _ZeroInserted(_ExecuTorchLowered):
    """A node's frozen tensors under ExecuTorch's lowering of strided depthwise input gradients."""
    lowering = Lowering(pads_in_kernel=True, shifted_strided_input_grad=True, zero_inserted_depthwise_input_grad=True)


# name: (kernel, stride, pads (top, bottom, left, right), dilation, (H, W)): Lite0's TF-same stride-2 shapes
# (before < after), symmetric pads, odd sizes (zero kernel taps added), a stride per axis, a dilation
ZERO_INSERTED = {
    "k3s2_tf_same_even": (3, 2, (0, 1, 0, 1), 1, (12, 10)),
    "k5s2_tf_same_even": (5, 2, (1, 2, 1, 2), 1, (12, 10)),
    "k3s2_symmetric_even": (3, 2, (1, 1, 1, 1), 1, (12, 10)),
    "k3s2_symmetric_odd": (3, 2, (1, 1, 1, 1), 1, (11, 9)),
    "k5s2_tf_same_odd": (5, 2, (2, 2, 2, 2), 1, (11, 9)),
    "k5s2_symmetric_odd_even": (5, 2, (2, 2, 2, 2), 1, (11, 10)),
    "k3s2_no_pad_odd": (3, 2, (0, 0, 0, 0), 1, (11, 9)),
    "k3_stride_2x1": (3, (2, 1), (0, 1, 1, 1), 1, (12, 9)),
    "k3s3_tf_same": (3, 3, (1, 1, 0, 1), 1, (13, 11)),
    "k3s2_dilated": (3, 2, (2, 2, 2, 2), 2, (12, 10)),
}


def _zero_inserted_case(case):
    k, s, pads, d, hw = ZERO_INSERTED[case]
    c = 4
    rule = R.Conv2d(k, s, pads, d, c)
    x, wt = _x((2, c, *hw)), _x((c, 1, k, k), 1) * 0.3
    return bind(rule, x, {"weight": wt}), x, wt


@pytest.mark.parametrize("case", list(ZERO_INSERTED))
def test_strided_depthwise_input_gradient_as_zero_inserted_conv_matches_autograd(case):
    """`zero_inserted_depthwise_input_grad`: one stride-1 depthwise conv with the flipped kernel over the
    gradient with zeros inserted, no ConvTranspose; exact against autograd."""
    rule, x, wt = _zero_inserted_case(case)
    t, b, l, r = rule.pads
    xr = x.clone().requires_grad_(True)
    yr = F.conv2d(F.pad(xr, (l, r, t, b)), wt, None, rule.stride, 0, rule.dilation, rule.groups)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(g)
    w = _ZeroInserted(weight=wt)
    assert rule._zero_insertion(w) is not None
    with _Ops() as ops:
        gx = rule.backward(g, {}, w, Need((True,), frozenset()))[0][0]
    assert gx.shape == x.shape and rel_err(gx, xr.grad) < 1e-5
    assert not any("convolution_backward" in o or "conv_transpose" in o for o in ops), ops
    assert sum("convolution" in o for o in ops) == 1, ops


class _ZeroInsertedSplit(_ZeroInserted):
    """... with the zero-inserted gradient split into batch parts of one sample (any sample exceeds 1 byte)."""
    lowering = Lowering(pads_in_kernel=True, shifted_strided_input_grad=True, zero_inserted_depthwise_input_grad=True,
                        zero_inserted_split_bytes=1)


@pytest.mark.parametrize("case", ["k3s2_tf_same_even", "k5s2_tf_same_even", "k3_stride_2x1", "k3s2_dilated"])
def test_zero_inserted_input_gradient_by_batch_parts_matches_autograd(case):
    """`zero_inserted_split_bytes`: the zero-inserted gradient larger than the limit is convolved by batch parts
    (one conv each, here one sample each: 3 parts), joined along the batch; exact against autograd."""
    rule, _, wt = _zero_inserted_case(case)
    x = _x((3, *rule.in_chw), 2)
    xr = x.clone().requires_grad_(True)
    t, b, l, r = rule.pads
    yr = F.conv2d(F.pad(xr, (l, r, t, b)), wt, None, rule.stride, 0, rule.dilation, rule.groups)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(g)
    with _Ops() as ops:
        gx = rule.backward(g, {}, _ZeroInsertedSplit(weight=wt), Need((True,), frozenset()))[0][0]
    assert gx.shape == x.shape and rel_err(gx, xr.grad) < 1e-5
    assert sum("convolution" in o for o in ops) == 3 and sum("cat" in o for o in ops) == 1, ops


def test_zero_inserted_batch_parts_are_the_fewest_near_equal_within_the_limit():
    parts = R.Conv2d._batch_parts
    assert parts(8, 100, None) == [8] and parts(8, 100, 800) == [8] and parts(8, 100, 799) == [4, 4]
    assert parts(8, 100, 300) == [3, 3, 2] and parts(3, 100, 50) == [1, 1, 1]  # one sample each at least


@pytest.mark.parametrize("k, s, pads, n", [(3, 2, (1, 1), 11), (5, 2, (1, 2), 16), (4, 3, (1, 2), 17)])
def test_strided_depthwise_conv1d_input_gradient_as_zero_inserted_conv_matches_autograd(k, s, pads, n):
    """A 1-D depthwise conv (the Conv2d rule on an (N, C, 1, L) view) takes the same form along its one axis."""
    rule, x, wt = R.Conv1d(k, s, pads, 1, 4), _x((2, 4, n)), _x((4, 1, k), 1)
    rule = bind(rule, x, {"weight": wt})
    xr = x.clone().requires_grad_(True)
    yr = F.conv1d(F.pad(xr, pads), wt, None, s, 0, 1, 4)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(g)
    with _Ops() as ops:
        gx = rule.backward(g, {}, _ZeroInserted(weight=wt), Need((True,), frozenset()))[0][0]
    assert gx.shape == x.shape and rel_err(gx, xr.grad) < 1e-5
    assert not any("conv_transpose" in o or "convolution_backward" in o for o in ops), ops


def test_zero_inserted_input_gradient_only_for_a_frozen_depthwise_strided_kernel():
    """The old forms stay where the new one does not apply: a stride-1 conv (the flipped-kernel conv
    already), a grouped non-depthwise one, a trainable kernel (XNNPACK takes a conv only with a
    constant kernel), an axis whose pads differ by less than the dilation (no zero tap fits), and the other
    targets (the flag unset)."""
    rule, x, wt = _zero_inserted_case("k3s2_tf_same_even")
    assert rule._zero_insertion(_ZeroInserted(weight=wt)) is not None
    assert rule._zero_insertion(_ExecuTorchLowered(weight=wt)) is None

    class Trained(_ZeroInserted):
        def trainable(self, role):
            return role == "weight"

    assert rule._zero_insertion(Trained(weight=wt)) is None
    stride1 = bind(R.Conv2d(3, 1, 1, 1, 4), x, {"weight": wt})
    assert stride1._zero_insertion(_ZeroInserted(weight=wt)) is None
    wg = _x((4, 2, 3, 3), 1)
    grouped = bind(R.Conv2d(3, 2, 1, 1, 2), x, {"weight": wg})
    assert grouped._zero_insertion(_ZeroInserted(weight=wg)) is None
    dilated_odd = bind(R.Conv2d(3, 2, 2, 2, 4), _x((2, 4, 12, 11)), {"weight": wt})  # pads 2 and 1 on W
    assert dilated_odd._zero_insertion(_ZeroInserted(weight=wt)) is None


class _FrozenDepthwiseInputGrads(torch.nn.Module):
    """(g per case) -> each case's input gradient, the kernel a constant (as the program's frozen weights)."""

    def __init__(self, rules, kernels, tensors=_ZeroInserted):
        super().__init__()
        self.rules, self.tensors = rules, tensors
        for i, k in enumerate(kernels):
            self.register_buffer(f"k{i}", k)

    def forward(self, *gs):
        need = Need((True,), frozenset())
        return tuple(rule.backward(g, {}, self.tensors(weight=getattr(self, f"k{i}")), need)[0][0]
                     for i, (rule, g) in enumerate(zip(self.rules, gs)))


@pytest.mark.slow
def test_zero_inserted_input_gradients_run_in_xnnpack_with_int8_storable_kernels(tmp_path):
    """Lowered with XNNPACK (as the executorch target's step): every conv is delegated (the flipped kernel,
    zero taps included, folds to a constant), the results match autograd, and each kernel blob is still
    exactly int8 per channel, so the bundle stores it int8 (its size does not grow)."""
    pytest.importorskip("executorch")

    cases, c = ["k3s2_tf_same_even", "k5s2_tf_same_even", "k3s2_symmetric_odd", "k5s2_tf_same_odd"], 16
    rules, kernels, gs, want = [], [], [], []
    for i, case in enumerate(cases):
        k, s, pads, d, hw = ZERO_INSERTED[case]
        x, wt = _x((2, c, *hw)), _int8_depthwise_kernel(c, k, i)
        rule = bind(R.Conv2d(k, s, pads, d, c), x, {"weight": wt})
        xr = x.clone().requires_grad_(True)
        y = F.conv2d(F.pad(xr, (pads[2], pads[3], pads[0], pads[1])), wt, None, rule.stride, 0, rule.dilation, c)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
        y.backward(g)
        rules, kernels, gs, want = rules + [rule], kernels + [wt], gs + [g], want + [xr.grad]
    _check_xnnpack_only_int8_kernels(_FrozenDepthwiseInputGrads(rules, kernels), gs, want, cases, c,
                                     tmp_path / "gx.pte")


def test_zero_inserted_input_gradient_by_batch_parts_runs_as_one_xnnpack_call_per_part(tmp_path):
    """Lowered with XNNPACK: each batch part of a split zero-inserted input gradient is its own delegate call
    (XNNPACK's workspace holds one part's inner values), joined by ExecuTorch's cat; the result matches autograd."""
    pytest.importorskip("executorch")
    from edgetl.exporters.executorch import _delegated_ops, _lower
    from edgetl.runtime.backends.executorch import NativeMethod

    rule, _, wt = _zero_inserted_case("k3s2_tf_same_even")
    x = _x((3, *rule.in_chw), 2).requires_grad_(True)
    y = F.conv2d(F.pad(x, (0, 1, 0, 1)), wt, None, 2, 0, 1, rule.groups)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(g)
    et = _lower(_FrozenDepthwiseInputGrads([rule], [wt], _ZeroInsertedSplit).eval(), (g,), delegate=True)
    ops = _delegated_ops(et)
    assert ops["delegate_calls"] == 3 and ops["portable_op_kinds"] == {"aten::cat": 1}, ops
    path = tmp_path / "gx.pte"
    path.write_bytes(et.buffer)
    assert rel_err(torch.from_numpy(NativeMethod(path)([g.numpy()])[0]), x.grad) < 1e-5


class _Ops(TorchDispatchMode):
    """The aten ops run inside the block, by name (a transposed convolution as `conv_transpose`)."""

    def __enter__(self):
        self.names = []
        super().__enter__()
        return self.names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        transposed = func is torch.ops.aten.convolution.default and args[6]
        self.names.append("conv_transpose" if transposed else str(func))
        return func(*args, **(kwargs or {}))


# --- convs with a computed kernel as per-tap matmuls (ExecuTorch `full`: Lowering.computed_conv_as_matmul) --

class _Trained(dict):
    """A conv's tensors with a trainable weight, under the ExecuTorch (XNNPACK) lowering."""

    def __init__(self, w):
        from edgetl.exporters.executorch import DELEGATED

        super().__init__(w)
        self.lowering = DELEGATED

    def trainable(self, role):
        return role in self


class _ComputedKernelConv(torch.nn.Module):
    """(x, weight, g) per case -> the rule's output, input gradient (stride 1 only: a stride-2 one
    stays a transposed conv) and weight gradient, the weight a computed (program input) tensor."""

    def __init__(self, rules):
        super().__init__()
        self.rules = rules

    def forward(self, *xwg):
        out = []
        for i, rule in enumerate(self.rules):
            x, wt, g = xwg[3 * i : 3 * i + 3]
            w = _Trained({"weight": wt})
            gx_too = rule.stride == (1, 1)
            (gx,), grads = rule.backward(g, {"x": x}, w, Need((gx_too,), frozenset({"weight"})))
            out += [rule.compute([x], w), grads["weight"]] + ([gx] if gx_too else [])
        return tuple(out)


def _computed_kernel_case(case):
    rule, wt, _, x, g, dw = _weight_grad_case(case)
    xr, wr = x.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    t, b, l, r = rule.pads
    y = F.conv2d(F.pad(xr, (l, r, t, b)), wr, None, rule.stride, 0, rule.dilation, rule.groups)
    y.backward(g)
    return rule, (x, wt, g), [y.detach(), dw] + ([xr.grad] if rule.stride == (1, 1) else [])


class _AtenOps(TorchDispatchMode):
    """Records the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CONV_WEIGHT_GRADS))
def test_computed_kernel_conv_as_matmuls_matches_autograd(case):
    rule, args, want = _computed_kernel_case(case)
    with _AtenOps() as seen:
        got = _ComputedKernelConv([rule])(*args)
    for g, ref in zip(got, want):
        assert g.shape == ref.shape and rel_err(g, ref) < 1e-5
    # dense and depthwise convs run no convolution but a stride-2 one's input gradient (not computed here)
    as_matmul = rule.groups == 1 or rule.groups == rule.in_chw[0] == rule.out_chw[0]
    assert (torch.ops.aten.convolution in seen.ops) != as_matmul, seen.ops


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] = self.counts.get(func.overloadpacket, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case, matmuls", [("dense_3x3s1p1", 1), ("dense_3x3s2p1_even", 1), ("tf_same_s2", 1),
                                           ("dilated", 1), ("dense_3x3s1p1_wide", 9)])
def test_a_few_channel_conv_is_one_matmul_for_all_taps(case, matmuls):
    """ExecuTorch's lowering: a dense conv with a computed kernel and at most 8 input channels runs its forward and
    its weight gradient as one matmul over all kernel taps (XNNPACK's matmuls this narrow cost ~0.5-0.85 ms a tap
    at mnist_cnn's stem), a wider one a matmul per tap; both equal autograd's."""
    rule, wt, _, x, g, ref = _weight_grad_case(case)
    w = _Trained({"weight": wt})
    with _CountOps() as seen:
        y = rule.compute([x], w)
    assert seen.counts.get(torch.ops.aten.bmm, 0) == matmuls, seen.counts
    t, b, l, r = rule.pads
    assert rel_err(y, F.conv2d(F.pad(x, (l, r, t, b)), wt, None, rule.stride, 0, rule.dilation)) < 1e-5
    with _CountOps() as seen:
        _, grads = rule.backward(g, {"x": x}, w, Need((False,), frozenset({"weight"})))
    assert seen.counts.get(torch.ops.aten.bmm, 0) == matmuls, seen.counts
    assert grads["weight"].shape == ref.shape and rel_err(grads["weight"], ref) < 1e-5


@pytest.mark.slow
def test_computed_kernel_convs_leave_no_portable_convolution_in_executorch(tmp_path):
    """The `full` step's convs (forward, stride-1 input gradient, weight gradient) with a trainable kernel
    are matmuls XNNPACK delegates: ExecuTorch's portable convolution kernel ran them ~50x slower than
    torch (mnist_cnn `full`: 95% of the step). A stride-2 input gradient is left out (a transposed conv)."""
    pytest.importorskip("executorch")
    from edgetl.exporters.executorch import _delegated_ops, _lower
    from edgetl.runtime.backends.executorch import NativeMethod

    cases = ["dense_3x3s1p1", "dense_3x3s2p1_even", "dense_3x3s1p1_wide", "depthwise_k3s1p1", "depthwise_s2",
             "pointwise"]
    built = [_computed_kernel_case(c) for c in cases]
    module = _ComputedKernelConv([b[0] for b in built]).eval()
    args = tuple(a for b in built for a in b[1])
    et = _lower(module, args, delegate=True)
    ops = _delegated_ops(et)
    assert "aten::convolution" not in ops["portable_op_kinds"], ops
    path = tmp_path / "convs.pte"
    path.write_bytes(et.buffer)
    got = NativeMethod(path)([a.numpy() for a in args])
    want = [t for b in built for t in b[2]]
    assert len(got) == len(want)
    for case, g, w in zip([c for c, b in zip(cases, built) for _ in b[2]], got, want):
        assert rel_err(torch.from_numpy(g), w) < 1e-5, case


@pytest.mark.slow
def test_a_dense_conv_computed_kernel_taps_stay_inside_xnnpack():
    """A dense conv's kernel taps (forward and stride-1 input gradient) are slices XNNPACK takes, not selects on
    ExecuTorch's own kernels, which split the taps' matmuls into one delegate call each (mnist_cnn `full` b32:
    199 -> 51 instructions, step 37.4 -> 33.4 ms CPU)."""
    pytest.importorskip("executorch")
    from edgetl.exporters.executorch import _delegated_ops, _lower

    rule, args, _ = _computed_kernel_case("dense_3x3s1p1_wide")
    ops = _delegated_ops(_lower(_ComputedKernelConv([rule]).eval(), args, delegate=True))
    assert "aten::select_copy" not in ops["portable_op_kinds"] and ops["delegate_calls"] <= 2, ops


# --- a conv bias's gradient as ExecuTorch's lowering sums it: the batch first ---------------------------

class _BiasGrad(torch.nn.Module):
    """A conv rule's bias gradient for the output gradient g, under `lowering`."""

    def __init__(self, rule, lowering: Lowering):
        super().__init__()
        self.rule, self.lowering = rule, lowering

    def forward(self, g):
        w = _ExecuTorchLowered(bias=torch.zeros(g.shape[1]))
        w.lowering = self.lowering
        return self.rule.backward(g, {}, w, Need((False,), frozenset({"bias"})))[1]["bias"]


def test_conv_bias_gradient_sums_the_batch_first_in_executorch(tmp_path):
    """ExecuTorch's lowerings (with XNNPACK and without) sum a conv bias's gradient over the batch, then
    over positions: the portable sum adds contiguous samples ~3.5x faster than it walks (0, 2, 3) (task B
    in BENCHMARKS.md). Run by ExecuTorch's runtime, the gradient matches autograd's."""
    pytest.importorskip("executorch")
    import dataclasses

    from edgetl.exporters.executorch import _lower, lowering
    from edgetl.runtime.backends.executorch import NativeMethod

    x, wt = _x((3, 4, 9, 7)), _x((5, 4, 3, 3), 1) * 0.3
    rule = bind(R.Conv2d(3, 1, 1), x, {"weight": wt})
    br = torch.zeros(5, requires_grad=True)
    yr = F.conv2d(x, wt, br, 1, 1)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(4))
    yr.backward(g)
    for delegate in (True, False):
        # a gradient past `xnnpack_bias_sum_max_bytes` (test_small_conv_bias_gradients_sum_inside_xnnpack)
        step = _BiasGrad(rule, dataclasses.replace(lowering(delegate), xnnpack_bias_sum_max_bytes=None)).eval()
        sums = [n.args[1] for n in torch.export.export(step, (g,), strict=False).graph.nodes
                if n.target is torch.ops.aten.sum.dim_IntList]
        assert sums == [[0], [1, 2]], sums
        path = tmp_path / f"bias_{delegate}.pte"
        path.write_bytes(_lower(step, (g,), delegate).buffer)
        (gb,) = NativeMethod(path)([g.numpy()])
        assert rel_err(torch.from_numpy(gb), br.grad) < 1e-6, delegate


class _MaskedBiasAndInputGrad(torch.nn.Module):
    """A conv rule's input and bias gradients for the output gradient g * mask, under `lowering`: the
    masked gradient has two readers, as in a network's backward."""

    def __init__(self, rule, weight, lowering: Lowering):
        super().__init__()
        self.rule, self.lowering = rule, lowering
        self.register_buffer("weight", weight)

    def forward(self, g, mask):
        w = _ExecuTorchLowered(bias=torch.zeros(g.shape[1]), weight=self.weight)
        w.lowering = self.lowering
        gx, grads = self.rule.backward(g * mask, {}, w, Need((True,), frozenset({"bias"})))
        return gx[0], grads["bias"]


def test_small_conv_bias_gradients_sum_inside_xnnpack(tmp_path):
    """With `Lowering.xnnpack_bias_sum_max_bytes`, a conv bias gradient no larger than the limit is two means
    XNNPACK runs in the same call as the input gradient (no portable op, no layout copy cuts it), a larger
    one keeps the portable sums; run by ExecuTorch's runtime, both match autograd's (tasks F and I, BENCHMARKS.md)."""
    pytest.importorskip("executorch")
    import dataclasses

    from edgetl.exporters.executorch import _lower, lowering
    from edgetl.runtime.backends.executorch import NativeMethod

    x, wt = _x((3, 4, 9, 7)).requires_grad_(), _x((5, 4, 3, 3), 1) * 0.3
    rule = bind(R.Conv2d(3, 1, 1), x.detach(), {"weight": wt})
    br = torch.zeros(5, requires_grad=True)
    yr = F.conv2d(x, wt, br, 1, 1)
    gen = torch.Generator().manual_seed(5)
    g, mask = torch.randn(yr.shape, generator=gen), (torch.rand(yr.shape, generator=gen) > 0.3).float()
    yr.backward(g * mask)
    nbytes = g.numel() * g.element_size()
    for limit, portable in ((nbytes, False), (nbytes - 1, True)):
        low = dataclasses.replace(lowering(True), xnnpack_bias_sum_max_bytes=limit)
        et = _lower(_MaskedBiasAndInputGrad(rule, wt, low).eval(), (g, mask), True)
        ops = [str(n.target) for n in et.exported_program().graph.nodes if n.op == "call_function"]
        assert any("sum" in op for op in ops) == portable, ops
        if not portable:  # one XNNPACK call, nothing of ExecuTorch's own between
            assert sum("call_delegate" in op for op in ops) == 1 and all(
                "call_delegate" in op or "getitem" in op for op in ops), ops
        path = tmp_path / f"bias_{limit}.pte"
        path.write_bytes(et.buffer)
        gx, gb = NativeMethod(path)([g.numpy(), mask.numpy()])
        assert rel_err(torch.from_numpy(gb), br.grad) < 1e-6, limit
        assert rel_err(torch.from_numpy(gx), x.grad) < 1e-5, limit


class _BiasGradOf(torch.nn.Module):
    """`rules.conv.bias_grad` of g alone, under `lowering`."""

    def __init__(self, lowering: Lowering):
        super().__init__()
        self.w = _ExecuTorchLowered()
        self.w.lowering = lowering

    def forward(self, g):
        return bias_grad(g, tuple(g.shape[1:]), self.w)


def test_xnnpack_bias_sums_stay_within_fp32_summation_noise_at_full_size(tmp_path):
    """A conv bias gradient of EfficientNet-Lite0's size (b8, 112², 6 MiB: 100,352 values per channel that mostly
    cancel, as a masked gradient's) summed as XNNPACK's two means is within fp32 summation noise of its float64 sum:
    2.1e-6 of the largest here, against 4.1e-6 for ExecuTorch's portable batch-first sums (one sequential fp32 pass:
    this bound fails it) and 1.3e-7 for torch's; 1.7-2.6e-6 over other seeds (task M2, BENCHMARKS.md)."""
    pytest.importorskip("executorch")
    import dataclasses

    from edgetl.exporters.executorch import _lower, lowering
    from edgetl.runtime.backends.executorch import NativeMethod

    gen = torch.Generator().manual_seed(0)
    shape = (8, 16, 112, 112)
    g = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) > 0.5)
    low = dataclasses.replace(lowering(True), xnnpack_bias_sum_max_bytes=g.numel() * g.element_size())
    path = tmp_path / "bias.pte"
    path.write_bytes(_lower(_BiasGradOf(low).eval(), (g,), True).buffer)
    (got,) = NativeMethod(path)([g.numpy()])
    assert rel_err(torch.from_numpy(got).double(), g.double().sum((0, 2, 3))) < 3e-6


def test_small_nodes_are_pulled_into_their_producers_partition():
    """A small value computed only from one partition's values (a bias gradient's means) joins that partition
    unless that makes a cycle; a large one stays (task F, BENCHMARKS.md: torch's partitioner left the means in their
    users' partition, interleaved with the backward's, and each layer was cut into its own calls)."""
    from torch.fx.passes.infra.partitioner import Partition

    from edgetl.exporters.executorch import pulled_into_producers

    class M(torch.nn.Module):
        def forward(self, x):
            a = x * 2                                  # backward's partition
            m = a.mean((2, 3), keepdim=True) * 3       # small: pulled
            big = a + 1                                # large: stays
            return a * 3, m * 4, big

    graph = torch.export.export(M(), (torch.ones(2, 64, 16, 16),)).graph
    ops = [n for n in graph.nodes if n.op == "call_function"]
    mul_a, mean, mul_m, big, mul_a3, mul_m4 = ops
    back = Partition(0, [mul_a, mul_a3])
    users = Partition(1, [mean, mul_m, big, mul_m4])
    assert pulled_into_producers(graph, [back, users]) == 3
    assert set(back.nodes) == {mul_a, mul_a3, mean, mul_m, mul_m4}
    assert set(users.nodes) == {big}
