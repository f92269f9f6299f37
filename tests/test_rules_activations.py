"""Activations beyond ReLU/SiLU (LeakyReLU, PReLU, Hardtanh/clamp, ELU/SELU/CELU, Softplus, Mish),
upsampling (nearest, bilinear, 1-D linear) and global max pooling: each rule against torch autograd of torch's own op,
what it keeps, its forward + backward exported to ONNX (run in onnxruntime), lowered by
torch.export and run as one ExecuTorch program; traced from models as users write them, with the
recipes that change what they keep (mask, q8, full for PReLU's slope)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetl
from edgetl import rules as R
from edgetl.errors import UnsupportedLayerError
from edgetl.optim import OptimizerConfig
from helpers import lean_vs_reference, rel_err
from rule_harness import (assert_executorch_runs_like_torch, assert_onnx_runs_like_torch,
                          assert_torch_export_without_scatter, bind, lean_grads, rule_step)

X2 = (2, 3, 9, 7)  # H != W, odd sizes
_SELU = (1.6732632423543772, 1.0507009873554805, 1.0)

PIECEWISE = {  # name: (rule, torch reference)
    "leaky_relu_0.1": (lambda: R.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1)),
    "leaky_relu_default": (lambda: R.LeakyReLU(), F.leaky_relu),
    "hardtanh": (lambda: R.Clamp(-1.0, 1.0), F.hardtanh),
    "hardtanh_-2_3": (lambda: R.Clamp(-2.0, 3.0), lambda x: F.hardtanh(x, -2.0, 3.0)),
    "clamp_min_-1": (lambda: R.Clamp(-1.0, None, inclusive=True), lambda x: torch.clamp(x, min=-1.0)),
    "clamp_max_2": (lambda: R.Clamp(None, 2.0, inclusive=True), lambda x: torch.clamp(x, max=2.0)),
}

SMOOTH = {  # name: (rule, torch reference)
    "elu": (lambda: R.ELU(), F.elu),
    "elu_0.5": (lambda: R.ELU(0.5), lambda x: F.elu(x, 0.5)),
    "selu": (lambda: R.ELU(*_SELU), F.selu),
    "celu_0.5": (lambda: R.ELU(0.5, 1.0, 2.0), lambda x: F.celu(x, 0.5)),
    "elu_scaled": (lambda: R.ELU(0.7, 1.3, 0.9), lambda x: torch.ops.aten.elu(x, 0.7, 1.3, 0.9)),
    "softplus": (lambda: R.Softplus(), F.softplus),
    "softplus_beta2_threshold3": (lambda: R.Softplus(2.0, 3.0), lambda x: F.softplus(x, 2.0, 3.0)),
    "mish": (lambda: R.Mish(), F.mish),
}

UPSAMPLE = {  # name: (rule args, input shape, torch reference)
    "nearest_x2": (("nearest", (18, 14), False, [2.0, 2.0]), X2, lambda x: F.interpolate(x, scale_factor=2)),
    "nearest_size": (("nearest", (13, 10)), X2, lambda x: F.interpolate(x, size=(13, 10))),
    "nearest_x1.5": (("nearest", (13, 10), False, [1.5, 1.5]), X2, lambda x: F.interpolate(x, scale_factor=1.5)),
    "nearest_x3x2": (("nearest", (27, 14), False, [3.0, 2.0]), X2, lambda x: F.interpolate(x, scale_factor=(3, 2))),
    "nearest_exact_x1.5": (("nearest-exact", (13, 10), False, [1.5, 1.5]), X2,
                           lambda x: F.interpolate(x, scale_factor=1.5, mode="nearest-exact")),
    "bilinear_x2": (("linear", (18, 14), False, [2.0, 2.0]), X2,
                    lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)),
    "bilinear_x2_align": (("linear", (18, 14), True, [2.0, 2.0]), X2,
                          lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)),
    "bilinear_size": (("linear", (11, 16)), X2, lambda x: F.interpolate(x, size=(11, 16), mode="bilinear")),
    "bilinear_x1.5": (("linear", (13, 10), False, [1.5, 1.5]), X2,
                      lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear")),
    "1d_linear_x2": (("linear", (22,), False, [2.0]), (2, 3, 11),
                     lambda x: F.interpolate(x, scale_factor=2, mode="linear")),
    "1d_nearest_x3": (("nearest", (33,), False, [3.0]), (2, 3, 11), lambda x: F.interpolate(x, scale_factor=3)),
}


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def _check(rule, x, ref, tol: float = 1e-5, w=None):
    """Forward and input gradient of the lean rule against torch autograd of `ref`; returns what it kept."""
    rule = bind(rule, x, w)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3))
    yr.backward(g)
    y, gx, _, kept = lean_grads(rule, x, g, w)
    assert y.shape == yr.shape and rel_err(y, yr) <= tol, rel_err(y, yr)
    assert gx.shape == x.shape and rel_err(gx, xr.grad) <= tol, rel_err(gx, xr.grad)
    return kept


@pytest.mark.parametrize("case", list(PIECEWISE))
def test_piecewise_linear_matches_autograd_and_masks_exactly(case):
    make, ref = PIECEWISE[case]
    x = _x(X2)
    x[0, 0, 0, :4] = torch.tensor([-2.0, -1.0, 0.0, 2.0])  # on the bounds: torch's own tie rule
    kept = _check(make(), x, ref, tol=0.0)
    assert list(kept) == ["x"] and kept["x"].dtype == torch.float32
    kept = _check(make().replace(mask=True), x, ref, tol=0.0)  # exact with a 1-byte mask
    assert list(kept) == ["m"] and kept["m"].dtype == torch.bool and kept["m"].shape == x.shape


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("mask", [False, True])
def test_prelu_matches_autograd_with_and_without_its_slope_training(channels, mask):
    x, a = _x(X2), torch.tensor([0.25, -0.1, 0.6][:channels])
    g = torch.randn(X2, generator=torch.Generator().manual_seed(3))
    xr, ar = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    yr = F.prelu(xr, ar)
    yr.backward(g)
    rule = bind(R.PReLU().replace(mask=mask), x, {"weight": a})
    # slope frozen (bias recipe): the input gradient from a mask (or x without the modifier)
    y, gx, gp, kept = lean_grads(rule, x, g, {"weight": a})
    assert rel_err(y, yr) == 0 and rel_err(gx, xr.grad) < 1e-6 and gp == {}
    assert list(kept) == (["m"] if mask else ["x"])
    # slope trains (full): it keeps x, whatever the modifier says
    y, gx, gp, kept = lean_grads(rule, x, g, {"weight": a}, frozenset({"weight"}))
    assert list(kept) == ["x"] and rel_err(gx, xr.grad) < 1e-6
    assert gp["weight"].shape == a.shape and rel_err(gp["weight"], ar.grad) < 1e-5


@pytest.mark.parametrize("case", list(SMOOTH))
def test_smooth_activation_matches_autograd_keeping_its_input(case):
    make, ref = SMOOTH[case]
    x = _x(X2)
    x[0, 0, 0, :3] = torch.tensor([25.0, 1.5, 0.0])  # past softplus' threshold, past a beta-scaled one, at 0
    kept = _check(make(), x, ref)
    assert list(kept) == ["v"] and torch.equal(kept["v"], x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", ["elu", "selu", "softplus", "mish"])
def test_quantized_keep_of_new_smooth_activations(case, bits):
    """q8 / q4 keep the derivative as codes: exactly the quantized reference, close to exact."""
    make, _ = SMOOTH[case]
    x = _x((4, 5, 6, 7))
    rule = make().replace(quant_bits=bits)
    _check(rule, x, lambda t: rule.reference([t], {}))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    exact = lean_grads(bind(make(), x), x, g)[1]
    _, gx, _, kept = lean_grads(bind(rule, x), x, g)
    err = float((gx - exact).norm() / exact.norm())
    low, high = {8: (3e-4, 5e-3), 4: (5e-3, 0.06)}[bits]
    assert low < err < high, err
    assert kept["q"].dtype == torch.uint8 and kept["q"].numel() == 4 * -(-5 * 6 * 7 * bits // 8)


@pytest.mark.parametrize("case", list(UPSAMPLE))
def test_upsample_matches_autograd_and_keeps_nothing(case):
    args, shape, ref = UPSAMPLE[case]
    assert _check(R.Upsample(*args), _x(shape), ref) == {}


@pytest.mark.parametrize("shape", [X2, (2, 3, 11), (2, 3, 20, 20)])
def test_global_max_pool_matches_autograd_and_keeps_one_position_per_channel(shape):
    ref = (lambda x: F.adaptive_max_pool2d(x, 1)) if len(shape) == 4 else (lambda x: F.adaptive_max_pool1d(x, 1))
    x = F.relu(torch.randint(-2, 2, shape, generator=torch.Generator().manual_seed(1)).float())  # ties: the first wins
    kept = _check(R.GlobalMaxPool(), x, ref, tol=0.0)
    assert list(kept) == ["i"] and kept["i"].shape == shape[:2]
    assert kept["i"].dtype == (torch.uint8 if np.prod(shape[2:]) <= 256 else torch.int32)


def test_nearest_by_an_integer_factor_is_a_repeat_not_a_matmul():
    rule = bind(R.Upsample("nearest", (18, 14), False, [2.0, 2.0]), _x(X2))
    assert rule.repeat == (2, 2)
    assert bind(R.Upsample("linear", (18, 14), False, [2.0, 2.0]), _x(X2)).repeat is None


# --- exportability -------------------------------------------------------------------------------

def _export_cases():
    cases = {k: (make, X2, {}) for k, (make, _) in PIECEWISE.items()}
    cases |= {f"{k}_mask": (lambda make=make: make().replace(mask=True), X2, {}) for k, (make, _) in PIECEWISE.items()}
    cases |= {k: (make, X2, {}) for k, (make, _) in SMOOTH.items()}
    cases |= {f"{k}_q8": (lambda make=make: make().replace(quant_bits=8), X2, {}) for k, (make, _) in SMOOTH.items()}
    cases["mish_q4"] = (lambda: R.Mish().replace(quant_bits=4), X2, {})
    cases["prelu"] = (R.PReLU, X2, {"weight": torch.tensor([0.25, -0.1, 0.6])})
    cases["prelu_mask"] = (lambda: R.PReLU().replace(mask=True), X2, {"weight": torch.tensor([0.2])})
    cases |= {f"up_{k}": (lambda a=a: R.Upsample(*a), s, {}) for k, (a, s, _) in UPSAMPLE.items()}
    cases["global_max"] = (R.GlobalMaxPool, X2, {})
    cases["global_max_1d"] = (R.GlobalMaxPool, (2, 3, 11), {})
    return cases


EXPORT_CASES = _export_cases()


def _rule_step(case):
    make, shape, w = EXPORT_CASES[case]
    return rule_step(make(), _x(shape), w)


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_rule_exports_to_onnx_and_runs_in_onnxruntime(case):
    assert_onnx_runs_like_torch(*_rule_step(case), y_atol=1e-5, gx_atol=1e-5)


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_rule_lowers_with_torch_export_without_scatter(case):
    assert_torch_export_without_scatter(*_rule_step(case), y_atol=1e-6, gx_atol=1e-6)


@pytest.mark.slow
def test_rules_run_as_one_executorch_program(tmp_path):
    """The new rules lowered to ExecuTorch (its own kernels) and run by its C++ runtime."""
    pytest.importorskip("executorch")
    cases = ["leaky_relu_0.1_mask", "hardtanh_mask", "prelu", "prelu_mask", "elu", "selu", "celu_0.5",
             "softplus_beta2_threshold3", "mish", "mish_q8", "up_nearest_x2", "up_bilinear_x2", "up_nearest_x1.5",
             "up_1d_linear_x2", "global_max"]
    assert_executorch_runs_like_torch([_rule_step(c) for c in cases], tmp_path / "rules.pte")


# --- traced from models as users write them --------------------------------------------------------

ACTS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "prelu": lambda: nn.PReLU(8, 0.2),
    "hardtanh": nn.Hardtanh,
    "elu": lambda: nn.ELU(inplace=True),
    "selu": nn.SELU,
    "celu": lambda: nn.CELU(0.5),
    "softplus": lambda: nn.Softplus(beta=2.0),
    "mish": nn.Mish,
}
RULE_OF = {"leaky_relu": R.LeakyReLU, "prelu": R.PReLU, "hardtanh": R.Clamp, "elu": R.ELU, "selu": R.ELU,
           "celu": R.ELU, "softplus": R.Softplus, "mish": R.Mish}


@pytest.mark.parametrize("pool", ["global", "2x2"])
def test_traced_adaptive_max_pool_matches_autograd(pool):
    torch.manual_seed(0)
    size = 1 if pool == "global" else 2
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(size), nn.Flatten(),
                          nn.Linear(8 * size * size, 4)).eval()
    pm = edgetl.prepare(model, "bias+mask", num_classes=4, input_size=10)
    assert any(isinstance(n.rule, R.GlobalMaxPool if pool == "global" else R.MaxPool) for n in pm.graph.nodes)
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    gerr, _ = lean_vs_reference(pm, x, torch.tensor([0, 1, 3]), OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5


class ActNet(nn.Module):
    """conv → BN → act → upsample ×2 (nearest) → conv → act → bilinear ×2 → pool → fc; with
    `core`, a swapaxes pair (no rule before decomposition) so the tracer takes its core ATen pass."""

    def __init__(self, act, core: bool = False):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.act1, self.conv2, self.act2 = act(), nn.Conv2d(8, 8, 3, stride=2), act()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.fc, self.core = nn.Linear(8, 4), core

    def forward(self, x):
        y = self.act1(self.bn(self.conv1(x)))
        y = self.act2(self.conv2(F.interpolate(y, scale_factor=2, mode="nearest")))
        if self.core:
            y = y.swapaxes(2, 3).swapaxes(2, 3)
        return self.fc(self.up(y).mean((2, 3)))


@pytest.mark.parametrize("core", [False, True], ids=["training_ir", "core_aten"])
@pytest.mark.parametrize("recipe", ["bias+mask", "full", "bias+mask+q8"])
@pytest.mark.parametrize("act", list(ACTS))
def test_traced_activation_and_upsampling_match_autograd(act, recipe, core):
    torch.manual_seed(0)
    model = ActNet(ACTS[act], core).eval()
    pm = edgetl.prepare(model, recipe, num_classes=4, input_size=7)
    rules = [n.rule for n in pm.graph.nodes if isinstance(n.rule, RULE_OF[act])]
    assert len(rules) == 2  # one rule each, never a decomposition into exp / where / mul
    assert [type(n.rule) for n in pm.graph.nodes if isinstance(n.rule, R.Upsample)] == [R.Upsample] * 2
    x = torch.randn(3, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    gerr, perr = lean_vs_reference(pm, x, torch.tensor([0, 1, 3]), OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < 1e-5
    if act == "prelu":  # its slope trains under full only
        slopes = {pm.graph.node(n).params["weight"] for n in ("act1", "act2")}
        assert slopes <= set(pm.trainable) if recipe == "full" else not slopes & set(pm.trainable)


def test_recipes_choose_what_the_new_activations_keep():
    torch.manual_seed(0)
    kinds = {}
    for act in ("leaky_relu", "prelu", "mish"):
        for recipe in ("bias", "bias+mask", "bias+mask+q8", "full+mask"):
            pm = edgetl.prepare(ActNet(ACTS[act]).eval(), recipe, num_classes=4, input_size=7)
            kinds[act, recipe] = {k.dtype for k in pm.memory(8).kept if k.node == "act1"}
    assert kinds["leaky_relu", "bias"] == {"float32"} and kinds["leaky_relu", "bias+mask"] == {"bool"}
    assert kinds["prelu", "bias+mask"] == {"bool"} and kinds["prelu", "full+mask"] == {"float32"}  # slope trains
    assert kinds["mish", "bias+mask"] == {"float32"} and kinds["mish", "bias+mask+q8"] == {"uint8", "float32"}
    up = [k for k in edgetl.prepare(ActNet(ACTS["mish"]).eval(), "full", num_classes=4, input_size=7).memory(8).kept
          if k.layer.startswith("upsample")]
    assert up == []  # upsampling keeps nothing


# --- unsupported ops point at the user's source, never into torch ----------------------------------

class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softsign())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_unsupported_torch_layer_is_placed_in_the_users_source_not_in_torch():
    import inspect

    with pytest.raises(UnsupportedLayerError) as e:
        edgetl.prepare(Wrapped(), "bias", num_classes=2, input_size=8)
    lines, start = inspect.getsourcelines(Wrapped.forward)
    line = start + next(i for i, text in enumerate(lines) if "self.body(x)" in text)
    assert "Softsign 'body.1'" in str(e.value) and e.value.where == f"{__file__}:{line}", str(e.value)
    with pytest.raises(UnsupportedLayerError) as e:  # nothing of the user's on its stack: no place, the module path
        edgetl.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardshrink(), nn.Flatten(), nn.Linear(144, 2)), "bias",
                       num_classes=2, input_size=8)
    assert e.value.where == "" and "site-packages" not in str(e.value) and "Hardshrink '1'" in str(e.value)
    assert "(from aten.hardshrink.default)" in str(e.value)  # the decomposed op is named by what the user wrote


@pytest.mark.parametrize("rule", [R.activation.ReLU(), R.activation.ReLU6(), R.activation.Hardswish(),
                                  R.activation.Hardsigmoid(), R.activation.LeakyReLU(0.1),
                                  R.activation.Clamp(-1.0, 2.0)], ids=lambda r: r.kind)
def test_float_keep_has_a_local_derivative_equal_to_its_backward(rule):
    """Every float-keeping activation names its local derivative (what the analytic replay of
    onnxruntime's schedule computes early, before the gradient it multiplies) and the backward from
    it equals the backward from the kept input and autograd's."""
    x = torch.linspace(-7, 7, 2 * 3 * 29).reshape(2, 3, 29).requires_grad_()
    y = rule.compute([x], {})
    g = torch.randn_like(y)
    need = R.Need((True,), frozenset())
    kept = rule.keep([x.detach()], y.detach(), {}, need)
    d = rule.local_derivative(kept, torch.float32)
    assert d is not None
    (expected,) = torch.autograd.grad(y, x, g)
    assert torch.equal(rule.backward(g, d, {}, need)[0][0], rule.backward(g, kept, {}, need)[0][0])
    assert torch.allclose(rule.backward(g, d, {}, need)[0][0], expected, atol=1e-6)
