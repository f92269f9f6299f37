"""Powers, roots and quotients of activations written out in `forward` (a norm computed by hand, as the official
ConvNeXt's channels-first LayerNorm and an RMSNorm with rsqrt): each rule against torch autograd, what it keeps,
and a traced model whose lean step matches autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import edgetl
from edgetl import rules as R
from edgetl.optim import OptimizerConfig
from edgetl.rules import Need
from helpers import lean_vs_reference, rel_err
from rule_harness import assert_onnx_runs_like_torch, bind, lean_grads, rule_step

X = (2, 3, 5, 4)


def _x(shape=X, positive=False, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.abs() + 0.5 if positive else x


UNARY = {  # name: (rule, torch op, positive input, what it keeps)
    "square": (lambda: R.Pow(2), lambda x: x.pow(2), False, {"x"}),
    "cube": (lambda: R.Pow(3), lambda x: x ** 3, False, {"x"}),
    "pow_1.5": (lambda: R.Pow(1.5), lambda x: x.pow(1.5), True, {"x"}),
    "pow_-1": (lambda: R.Pow(-1), lambda x: x.pow(-1), True, {"x"}),
    "sqrt": (R.Sqrt, torch.sqrt, True, {"y"}),
    "rsqrt": (R.Rsqrt, torch.rsqrt, True, {"y"}),
}


@pytest.mark.parametrize("case", list(UNARY))
def test_power_rule_matches_autograd(case):
    make, op, positive, keeps = UNARY[case]
    x = _x(positive=positive)
    g = _x(seed=1)
    y, gx, _, kept = lean_grads(bind(make(), x), x, g)
    xr = x.clone().requires_grad_()
    yr = op(xr)
    yr.backward(g)
    assert torch.allclose(y, yr.detach()) and rel_err(gx, xr.grad) < 1e-6
    assert set(kept) == keeps


@pytest.mark.parametrize("case", ["square", "pow_1.5", "sqrt", "rsqrt"])
def test_power_rule_exports_to_onnx_and_runs_in_onnxruntime(case):
    make, _, positive, _ = UNARY[case]
    assert_onnx_runs_like_torch(*rule_step(make(), _x(positive=positive)), y_atol=1e-5, gx_atol=1e-5)


@pytest.mark.parametrize("b_shape", [X, (2, 1, 5, 4), (2, 3, 1, 1)], ids=["same", "over_channels", "per_channel"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_quotient_of_two_activations_matches_autograd(b_shape, need):
    a, b, g = _x(), _x(b_shape, positive=True, seed=2), _x(seed=1)
    rule = R.Div().bind([X[1:], b_shape[1:]], X[1:])
    nd = Need(need, frozenset())
    y, kept = rule.forward([a, b], {}, nd)
    (ga, gb), _ = rule.backward(g, dict(kept), {}, nd)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    (ar / br).backward(g)
    assert torch.allclose(y, a / b)
    assert (ga is None) != need[0] and (gb is None) != need[1]
    if need[0]:
        assert rel_err(ga, ar.grad) < 1e-6
    if need[1]:
        assert rel_err(gb, br.grad) < 1e-6
    assert set(kept) == ({"a", "b"} if need[1] else {"b"})  # a only when b needs a gradient


class ChannelsFirstLayerNorm(nn.Module):
    """facebookresearch/ConvNeXt's LayerNorm(data_format="channels_first"), as written there."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.rand(c) - 0.5), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class HandNormNet(nn.Module):
    """conv → hand-written channels-first LayerNorm → GELU → conv → rsqrt RMSNorm over channels → pool → fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm, self.act = nn.Conv2d(3, 8, 3, padding=1), ChannelsFirstLayerNorm(8), nn.GELU()
        self.conv2, self.fc = nn.Conv2d(8, 8, 3, stride=2), nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv2(self.act(self.norm(self.conv1(x))))
        y = y * torch.rsqrt(y.square().mean(1, keepdim=True) + 1e-5)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("recipe", ["bias+mask", "full"])
def test_traced_hand_written_norms_match_autograd(recipe):
    torch.manual_seed(0)
    pm = edgetl.prepare(HandNormNet().eval(), recipe, num_classes=4, input_size=7)
    kinds = {type(n.rule) for n in pm.graph.nodes}
    assert {R.Pow, R.Sqrt, R.Rsqrt, R.Div} <= kinds
    if recipe == "full":
        assert {"norm.weight", "norm.bias"} <= set(pm.trainable)
    x = torch.randn(3, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    gerr, perr = lean_vs_reference(pm, x, torch.tensor([0, 1, 3]), OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < 1e-5
