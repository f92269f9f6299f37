"""Tracing: the lean graph computes what the torch model computes, and unsupported layers are named."""
import pytest
import torch
import torch.nn as nn

import edgetl
from edgetl.backbones import load_backbone
from edgetl.errors import EdgeTLError, UnsupportedLayerError
from edgetl.program import Program
from edgetl.trace import trace


@pytest.mark.parametrize("name,size", [("mnist_cnn", 28), ("efficientnet_lite0", 64), ("mobilenet_v2", 64),
                                       ("mobilenet_v3_small", 64)])
def test_traced_graph_equals_model(name, size):
    bb = load_backbone(name)
    graph = trace(bb.model, (bb.in_channels, size, size), list(bb.blocks))
    assert not any(n.rule.kind in ("affine", "pad") for n in graph.nodes)  # all BN and padding folded
    x = torch.randn(2, bb.in_channels, size, size)
    with torch.no_grad():
        want = bb.model(x)
        got = Program(graph, lambda name, zero=None: graph.tensors[name]).forward(x, {}, train=False)[0]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unsupported_layers_are_listed_with_their_paths():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.GroupNorm(2, 4)
            self.act = nn.GELU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.norm(self.conv(x))).mean((2, 3)))

    with pytest.raises(UnsupportedLayerError) as e:
        edgetl.prepare(Bad(), "bias", num_classes=2, input_size=8)
    msg = str(e.value)
    assert "GroupNorm at 'norm'" in msg and "GELU at 'act'" in msg and "(2)" in msg
    assert isinstance(e.value, ValueError)


def test_overlapping_pool_is_unsupported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d at '1'"):
        edgetl.prepare(model, "head", num_classes=2, input_size=8)


def test_model_without_linear_head_is_refused():
    with pytest.raises(EdgeTLError, match="no classifier head"):
        edgetl.prepare(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "bias",
                       num_classes=2, input_size=8)


def test_bad_arguments():
    with pytest.raises(EdgeTLError, match="num_classes"):
        edgetl.prepare("mnist_cnn", "bias", num_classes=1)
    with pytest.raises(EdgeTLError, match="frozen_dtype"):
        edgetl.prepare("mnist_cnn", "bias", num_classes=10, frozen_dtype="int4")
