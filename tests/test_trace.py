"""Tracing: the lean graph computes what the torch model computes, unsupported ops are named with
their place in the user's source, and the classifier head is found (or named)."""
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetl
from edgetl.backbones import load_backbone
from edgetl.errors import EdgeTLError, UnsupportedLayerError
from edgetl.optim import OptimizerConfig
from edgetl.program import Program
from edgetl.trace import trace
from helpers import lean_vs_reference


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


def _line(fn, text: str) -> int:
    """The line number of `text` in the source of `fn`."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


class Sine(nn.Module):
    def forward(self, x):
        return torch.sin(x)


class Cosine(nn.Module):
    def forward(self, x):
        return torch.cos(x)


class Bad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = Sine()
        self.act = Cosine()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.norm(self.conv(x))
        return self.fc(self.act(y).mean((2, 3)))


def test_unsupported_op_is_named_once_with_its_source_line():
    with pytest.raises(UnsupportedLayerError) as e:
        edgetl.prepare(Bad(), "bias", num_classes=2, input_size=8)
    msg = str(e.value)
    assert "sin" in msg and "Sine 'norm'" in msg
    assert f"test_trace.py:{_line(Sine.forward, 'torch.sin')}" in msg
    assert "cos" not in msg and "other" not in msg  # the cosine is downstream of the sine
    assert isinstance(e.value, ValueError) and e.value.others == 0


class TwoBad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        a = torch.cos(self.a(x))
        b = torch.sin(self.b(x))
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


def test_independent_unsupported_ops_are_counted():
    with pytest.raises(UnsupportedLayerError) as e:
        edgetl.prepare(TwoBad(), "bias", num_classes=2, input_size=8)
    assert "cos" in str(e.value) and f":{_line(TwoBad.forward, 'torch.cos')}" in str(e.value)
    assert "and 1 other unsupported op" in str(e.value) and e.value.others == 1


def test_a_builder_says_why_it_refuses():
    class Reflect(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")).mean((2, 3)))

    with pytest.raises(UnsupportedLayerError, match="reflect"):
        edgetl.prepare(Reflect(), "head", num_classes=2, input_size=8)


def test_model_without_classifier_head_is_refused():
    with pytest.raises(EdgeTLError, match="no classifier head.*head="):
        edgetl.prepare(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "bias",
                       num_classes=2, input_size=8)


class SqueezeHead(nn.Module):
    """squeezenet's classifier: dropout, 1×1 conv, ReLU, global pooling, flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


@pytest.mark.parametrize("head", [None, "classifier.1"])
def test_conv_classifier_becomes_pool_then_linear(head):
    torch.manual_seed(0)
    pm = edgetl.prepare(SqueezeHead(), "bias+mask", num_classes=3, input_size=8, head=head)
    kinds = [n.rule.kind for n in pm.graph.nodes]
    assert kinds[-3:] == ["global_avgpool", "flatten", "linear"] and kinds.count("conv2d") == 1
    assert pm.graph.tensors["head.weight"].shape == (3, 8)
    assert not any(t.startswith("classifier.1") for t in pm.graph.tensors)
    g = torch.Generator().manual_seed(1)
    gerr, perr = lean_vs_reference(pm, torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 0]),
                                   OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5 and max(perr.values()) < 1e-5


def test_named_head_must_be_the_classifier():
    with pytest.raises(EdgeTLError, match="'features.0' is a conv, but not a 1×1 conv"):
        edgetl.prepare(SqueezeHead(), "bias", num_classes=3, input_size=8, head="features.0")
    with pytest.raises(EdgeTLError, match="'nope' is not a Linear or 1×1 Conv2d"):
        edgetl.prepare(SqueezeHead(), "bias", num_classes=3, input_size=8, head="nope")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(EdgeTLError, match="'1' must produce the model's output"):
        edgetl.prepare(mlp, "bias", num_classes=3, input_shape=(3, 2, 2), head="1")


class ShapeDependent(nn.Module):
    """A Python `if` on the input's shape: torch.export specialises it at the export shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if x.shape[-1] > x.shape[-2]:  # wide inputs: pool the width only first
            y = y.mean(3, keepdim=True)
        return self.fc(y.mean((2, 3)))


def test_non_square_input_shape():
    torch.manual_seed(0)
    pm = edgetl.prepare(ShapeDependent(), "full", num_classes=3, input_shape=(3, 6, 10))
    assert pm.input_shape == (3, 6, 10) and pm.input_size is None
    assert "mean" in [n.rule.kind for n in pm.graph.nodes]
    g = torch.Generator().manual_seed(2)
    gerr, perr = lean_vs_reference(pm, torch.randn(3, 3, 6, 10, generator=g), torch.tensor([0, 2, 1]),
                                   OptimizerConfig.make("sgd", lr=0.1))
    assert max(gerr.values()) < 1e-5 and max(perr.values()) < 1e-5


def test_one_dimensional_input_shape():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 8), nn.ReLU(), nn.Linear(8, 2))
    pm = edgetl.prepare(model, "full", num_classes=3, input_shape=(4, 16))
    assert pm.input_shape == (4, 16) and pm.input_size == 16 and pm.summary()["input_shape"] == [4, 16]
    assert pm.memory(2).input_bytes == 2 * 4 * 16 * 4 + 2 * 8
    model.input_shape = (4, 16)  # a model may carry its own input shape (the family models do)
    assert edgetl.prepare(model, "bias", num_classes=3).input_shape == (4, 16)


def test_bad_arguments():
    with pytest.raises(EdgeTLError, match="num_classes"):
        edgetl.prepare("mnist_cnn", "bias", num_classes=1)
    with pytest.raises(EdgeTLError, match="frozen_dtype"):
        edgetl.prepare("mnist_cnn", "bias", num_classes=10, frozen_dtype="int4")
    with pytest.raises(EdgeTLError, match="input_shape must be"):
        edgetl.prepare("mnist_cnn", "bias", num_classes=10, input_shape=(1, 28, 28, 1))
    with pytest.raises(EdgeTLError, match="not both"):
        edgetl.prepare("mnist_cnn", "bias", num_classes=10, input_size=28, input_shape=(1, 28, 28))
    with pytest.raises(EdgeTLError, match="has 3 channels; the model takes 1"):
        edgetl.prepare("mnist_cnn", "bias", num_classes=10, input_shape=(3, 28, 28))


def test_export_failure_is_an_edgetl_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            x = x.mean((2, 3))
            return self.fc(x if x.sum() > 0 else -x)  # a branch on values, not shapes

    with pytest.raises(EdgeTLError, match="torch.export could not capture the model"):
        edgetl.prepare(DataDependent(), "head", num_classes=2, input_size=4)


def test_bound_rules_are_immutable():
    pm = edgetl.prepare("mnist_cnn", "bias", num_classes=10)
    rule = next(n.rule for n in pm.graph.nodes if n.rule.kind == "relu")
    with pytest.raises(AttributeError, match="immutable"):
        rule.mask = True
    assert rule.replace(mask=True).mask and not rule.mask


SQUEEZE_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)

def build():
    return Net()
"""


def test_cli_input_shape_and_head(tmp_path, capsys):
    import json

    from edgetl.cli import main

    path = tmp_path / "squeeze_net.py"
    path.write_text(SQUEEZE_FILE)
    args = ["plan", f"{path}:build", "--recipe", "bias", "--num-classes", "3", "--input-shape", "3,8,12", "--json"]
    assert main(args + ["--head", "classifier.1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_shape"] == [3, 8, 12] and out["input_size"] is None
    assert main(args + ["--head", "features.0"]) == 2
    assert "not a 1×1 conv" in capsys.readouterr().err
    assert main(args[:-3] + ["--input-shape", "3,x", "--json"]) == 2
    assert "--input-shape" in capsys.readouterr().err
