"""The 28x28 MNIST digit CNN of the `digit_recognizer` package, loaded without importing that package."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..errors import EdgeTLError
from .base import Backbone

_MODULE_NAME = "edgetl_digit_recognizer_model"


def _package_dir() -> Path:
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeTLError("mnist_cnn needs the 'digit-recognizer-py' package, which is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _model_module(package: Path) -> ModuleType:
    # Loaded by path: importing `digit_recognizer` itself would pull in torchvision.
    if _MODULE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, package / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_MODULE_NAME] = module
    return sys.modules[_MODULE_NAME]


def mnist_cnn(pretrained: bool = True) -> Backbone:
    """Three conv/ReLU/max-pool stages and a 2-layer MLP; input 1x28x28, white digit on black, MNIST normalization."""
    package = _package_dir()
    model: nn.Module = _model_module(package).CNN()
    if pretrained:
        state = torch.load(package / "models" / "handwriting_model.pth", map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return Backbone(
        name="mnist_cnn",
        model=model.eval(),
        input_size=28,
        in_channels=1,
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        head="fc_layers.2",
        pretrained=pretrained,
        blocks=("conv_layers.0", "conv_layers.3", "conv_layers.6", "fc_layers.0"),
    )
