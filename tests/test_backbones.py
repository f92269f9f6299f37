import copy
import operator

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from edgetl.backbones import Backbone, available_backbones, load_backbone

BUILTINS = ["efficientnet_lite0", "mnist_cnn", "mobilenet_v2", "mobilenet_v3_small"]
ALLOWED_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid,
                   nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.ZeroPad2d)
ALLOWED_FUNCTIONS = {operator.add, operator.mul, torch.flatten}
ALLOWED_METHODS = {"view", "size", "flatten"}
PARAMS = {"efficientnet_lite0": 4.65e6, "mnist_cnn": 390_410, "mobilenet_v2": 3.5e6, "mobilenet_v3_small": 2.54e6}
CATS = {281, 282, 283, 284, 285}


@pytest.fixture(scope="module")
def backbones() -> dict[str, Backbone]:
    return {name: load_backbone(name) for name in BUILTINS}


def test_available_backbones():
    assert available_backbones() == BUILTINS


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as err:
        load_backbone("resnet50")
    for name in BUILTINS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", BUILTINS)
def test_traces_with_allowed_layers_only(backbones, name):
    bb = backbones[name]
    gm = torch.fx.symbolic_trace(bb.model)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            assert isinstance(module, ALLOWED_MODULES), (node.target, type(module))
            assert not getattr(module, "inplace", False), node.target
            if isinstance(module, nn.BatchNorm2d):
                src = node.args[0]
                assert src.op == "call_module" and isinstance(gm.get_submodule(src.target), nn.Conv2d)
        elif node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, node.target
        elif node.op == "call_method":
            assert node.target in ALLOWED_METHODS, node.target
    x = torch.randn(2, bb.in_channels, bb.input_size, bb.input_size)
    with torch.no_grad():
        y = gm(x)
    assert y.shape == (2, bb.num_classes)
    assert torch.equal(y, bb.model(x))


@pytest.mark.parametrize("name", BUILTINS)
def test_metadata(backbones, name):
    bb = backbones[name]
    assert bb.name == name and not bb.model.training
    assert len(bb.mean) == len(bb.std) == bb.in_channels
    head = bb.model.get_submodule(bb.head)
    assert isinstance(head, nn.Linear) and head.out_features == bb.num_classes
    n_params = sum(p.numel() for p in bb.model.parameters())
    assert abs(n_params - PARAMS[name]) / PARAMS[name] < 0.01
    for layer, m in bb.model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and layer != bb.head:
            owners = [p for p in bb.blocks if layer == p or layer.startswith(p + ".")]
            assert len(owners) == 1, layer
    assert bb.block_of(bb.head) == -1
    copy.deepcopy(bb.model)


def test_pretrained_flags():
    assert load_backbone("mobilenet_v2", pretrained=True).pretrained is False
    assert load_backbone("mobilenet_v3_small", pretrained=True).pretrained is False
    assert load_backbone("mnist_cnn", pretrained=False).pretrained is False


def test_efficientnet_lite0_block_names(backbones):
    bb = backbones["efficientnet_lite0"]
    assert bb.blocks == ("_conv_stem", *(f"_blocks.{i}" for i in range(16)), "_conv_head")
    assert bb.head == "_fc" and bb.pretrained
    assert bb.block_of("_blocks.1._depthwise_conv") == 2
    assert bb.block_of("_blocks.10._depthwise_conv") == 11


def _imagenet_top5(bb: Backbone, img: np.ndarray) -> list[int]:
    from skimage.transform import resize

    x = resize(img, (bb.input_size, bb.input_size), anti_aliasing=True).astype(np.float32)
    with torch.no_grad():
        logits = bb.model(bb.normalize(torch.from_numpy(x).permute(2, 0, 1)[None]))
    return logits[0].topk(5).indices.tolist()


def test_efficientnet_lite0_sees_a_cat(backbones):
    from skimage import data

    top5 = _imagenet_top5(backbones["efficientnet_lite0"], data.chelsea())
    assert top5[0] in CATS


def test_efficientnet_lite0_sees_coffee(backbones):
    from skimage import data

    top5 = _imagenet_top5(backbones["efficientnet_lite0"], data.coffee())
    assert top5[0] in {967, 968, 504}  # espresso, cup, coffee mug


def test_mnist_cnn_reads_sklearn_digits(backbones):
    from sklearn.datasets import load_digits

    bb = backbones["mnist_cnn"]
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, (4, 4, 4, 4))
    with torch.no_grad():
        pred = bb.model(bb.normalize(x)).argmax(1)
    accuracy = (pred == torch.tensor(digits.target)).float().mean().item()
    assert accuracy > 0.7


TINY = """
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4, 3)
        self.input_size = 16

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))

def build():
    return Tiny()

def build_backbone(pretrained=True):
    return dict(pretrained=pretrained)

not_a_function = 3
"""


def test_user_file_loader(tmp_path):
    path = tmp_path / "tiny_net.py"
    path.write_text(TINY)
    bb = load_backbone(f"{path}:build")
    assert bb.head == "fc" and bb.blocks == ("features",)
    assert (bb.input_size, bb.in_channels, bb.num_classes, bb.pretrained) == (16, 1, 3, False)
    assert bb.mean == (0.0,) and bb.std == (1.0,) and not bb.model.training
    gm = torch.fx.symbolic_trace(bb.model)
    assert gm(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_user_file_loader_returning_backbone(tmp_path):
    path = tmp_path / "tiny_bb.py"
    path.write_text(TINY + """
def make(pretrained=True):
    from edgetl.backbones import Backbone
    return Backbone("tiny", Tiny(), 16, 1, 3, (0.5,), (0.25,), "fc", pretrained, ("features.0",))
""")
    bb = load_backbone(f"{path}:make", pretrained=False)
    assert bb.name == "tiny" and bb.std == (0.25,) and not bb.pretrained and not bb.model.training


@pytest.mark.parametrize("suffix, message", [
    (":missing", "no function 'missing'"),
    (":not_a_function", "no function"),
    (":build_backbone", "not an nn.Module"),
    ("", "name the function"),
])
def test_user_file_loader_errors(tmp_path, suffix, message):
    path = tmp_path / "tiny_err.py"
    path.write_text(TINY)
    with pytest.raises(ValueError, match=message):
        load_backbone(f"{path}{suffix}")


def test_user_file_missing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(f"{tmp_path / 'nope.py'}:build")
