"""Each backward rule against torch autograd, on small models built to exercise it."""
import pytest
import torch
import torch.nn as nn

import edgetl
from edgetl.optim import OptimizerConfig
from helpers import lean_vs_reference


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _saturating_conv():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(8)  # many outputs past ReLU6's bounds: windows whose maximum is clamped
    return conv


class Net(nn.Module):
    def __init__(self, body: nn.Module, feat: int):
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(feat, 4)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.body(x))))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = _bn(c)
        self.act = nn.ReLU6()
        self.post = _bn(c)  # follows the add, not a conv: stays a per-channel affine

    def forward(self, x):
        return self.post(x + self.act(self.bn(self.conv(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1),
                                nn.Hardsigmoid())

    def forward(self, x):
        return x * self.se(x)


class Branches(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, 3, 1)
        self.b = nn.Conv2d(c, 5, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), torch.relu(self.b(x))], 1)


BODIES = {
    "conv_stride2": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), _bn(8), nn.ReLU()), 8),
    "conv_tf_same_padding": (lambda: nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(3, 6, 5, 2), nn.ReLU6()), 6),
    "conv_dilated": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, 1, 2, dilation=2), nn.Hardswish()), 4),
    "conv_grouped": (lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, 1, 1, groups=2), nn.ReLU()), 6),
    "depthwise_multiplier": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1, groups=3), nn.ReLU6()), 6),
    "depthwise_stride1_k5": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 5, 1, 2, groups=4)), 4),
    "conv_no_padding": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 4),
    "residual_and_affine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), Residual(4)), 4),
    "maxpool_ties": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), 4),
    "maxpool_odd": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)), 4),
    "relu6_maxpool_saturated": (lambda: nn.Sequential(_saturating_conv(), nn.ReLU6(), nn.MaxPool2d(2)), 4),
    "avgpool": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardswish(), nn.AvgPool2d(2)), 4),
    "squeeze_excite": (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.Hardswish(), SqueezeExcite(8)), 8),
    "concat": (lambda: Branches(3), 8),
    "hardsigmoid": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardsigmoid()), 4),
}


@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("recipe", ["full", "full+mask", "bias+mask"])
def test_rule_matches_autograd(body, recipe):
    torch.manual_seed(0)
    make, feat = BODIES[body]
    pm = edgetl.prepare(Net(make(), feat), recipe, num_classes=4, input_size=9 if "odd" in body else 8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, pm.input_size, pm.input_size, generator=g) * 2
    y = torch.tensor([0, 1, 3])
    gerr, perr = lean_vs_reference(pm, x, y, OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5, max(gerr.items(), key=lambda kv: kv[1])
    assert max(perr.values()) < 1e-5


def test_maxpool_ties_route_gradient_to_first_maximum():
    """A window of equal values (ReLU zeros) must send its gradient to one element only."""
    from edgetl.rules import MaxPool2d, Need

    rule = MaxPool2d(2).bind([(1, 2, 2)], (1, 1, 1))
    x = torch.zeros(1, 1, 2, 2)
    y, kept = rule.forward([x], {}, Need((True,), frozenset()))
    (gx,), _ = rule.backward(torch.ones_like(y), kept, {}, Need((True,), frozenset()))
    assert gx.sum() == 1 and gx[0, 0, 0, 0] == 1


def test_activation_before_a_max_pool_runs_after_it_at_the_pooled_size():
    """ReLU6 -> max pool is traced as max pool -> ReLU6 (they commute; gradients checked above), so its
    mask and its backward are at the pooled size, a quarter of the conv output."""
    pm = edgetl.prepare(Net(BODIES["relu6_maxpool_saturated"][0](), 4), "bias+mask", num_classes=4, input_size=8)
    assert [n.rule.kind for n in pm.graph.nodes][:3] == ["conv2d", "maxpool", "relu6"]
    (mask,) = [k for k in pm.memory(2).kept if k.layer.startswith("relu6")]
    assert mask.shape == [2, 4, 4, 4] and mask.dtype == "bool"


def test_masks_are_bool_and_smaller_than_float():
    pm_float = edgetl.prepare(Net(BODIES["conv_stride2"][0](), 8), "bias", num_classes=4, input_size=8)
    pm_mask = edgetl.prepare(Net(BODIES["conv_stride2"][0](), 8), "bias+mask", num_classes=4, input_size=8)
    kf = [k for k in pm_float.memory(4).kept if k.layer.startswith("relu")]
    km = [k for k in pm_mask.memory(4).kept if k.layer.startswith("relu")]
    assert kf[0].dtype == "float32" and km[0].dtype == "bool"
    assert km[0].bytes * 4 == kf[0].bytes
