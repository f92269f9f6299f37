"""MobileNetV3-Small, architecture only: no pretrained weights are available offline."""
from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn, init_weights, make_divisible
from .base import Backbone
from .mobilenet_v2 import IMAGENET_MEAN, IMAGENET_STD

_BN = {"eps": 1e-3, "momentum": 0.01}

# (kernel, expanded channels, output channels, squeeze-excite, activation, stride)
_SMALL = ((3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2), (3, 88, 24, False, nn.ReLU, 1),
          (5, 96, 40, True, nn.Hardswish, 2), (5, 240, 40, True, nn.Hardswish, 1),
          (5, 240, 40, True, nn.Hardswish, 1), (5, 120, 48, True, nn.Hardswish, 1),
          (5, 144, 48, True, nn.Hardswish, 1), (5, 288, 96, True, nn.Hardswish, 2),
          (5, 576, 96, True, nn.Hardswish, 1), (5, 576, 96, True, nn.Hardswish, 1))


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """[1x1 expand] -> kxk depthwise -> [squeeze-excite] -> 1x1 linear projection, residual when shapes allow."""

    def __init__(self, cin: int, kernel: int, mid: int, cout: int, se: bool, act: type[nn.Module], stride: int):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(cin, mid, 1, act=act, **_BN)] if mid != cin else []
        layers.append(conv_bn(mid, mid, kernel, stride, groups=mid, act=act, **_BN))
        if se:
            layers.append(SqueezeExcitation(mid, make_divisible(mid // 4)))
        layers.append(conv_bn(mid, cout, 1, **_BN))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV3Small(nn.Module):
    """torchvision's MobileNetV3-Small layout: `features.0..12`, `classifier = [Linear, Hardswish, Dropout, Linear]`."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [conv_bn(3, 16, 3, 2, act=nn.Hardswish, **_BN)]
        cin = 16
        for kernel, mid, cout, se, act, stride in _SMALL:
            features.append(InvertedResidual(cin, kernel, mid, cout, se, act, stride))
            cin = cout
        features.append(conv_bn(cin, 6 * cin, 1, act=nn.Hardswish, **_BN))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * cin, 1024), nn.Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(1024, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_small(pretrained: bool = False) -> Backbone:
    """MobileNetV3-Small (2.5M parameters), randomly initialised with a fixed seed (the same
    weights in every process, whatever the global RNG state): `pretrained` is accepted and ignored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MobileNetV3Small()
    return Backbone(
        name="mobilenet_v3_small",
        model=model.eval(),
        input_size=224,
        in_channels=3,
        num_classes=1000,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        head="classifier.3",
        pretrained=False,
        blocks=(*(f"features.{i}" for i in range(len(model.features))), "classifier.0"),
    )
