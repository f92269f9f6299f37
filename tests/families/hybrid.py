"""A timm-hybrid-like CNN whose forward has shape-dependent Python control flow, which torch.fx
symbolic tracing cannot pass: TF-'SAME' convolutions (timm Conv2dSame, padding computed from
x.size() with math.ceil and applied under `if pad_h > 0 or pad_w > 0`) and an
`if x.shape[-1] % 2: F.pad(...)` before a 2×2 pooling, as timm's hybrid stems and patch
embeddings write them. torch.export specialises both at the export shape."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import build
from ._timm_layers import BatchNormAct2d, Conv2dSame, Linear, SelectAdaptivePool2d


class ConvNormActSame(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.conv = Conv2dSame(in_chs, out_chs, kernel_size, stride, groups=groups, bias=False)
        self.bn = BatchNormAct2d(out_chs, act_layer=nn.SiLU, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ResBlockSame(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvNormActSame(in_chs, out_chs, 3, stride)
        self.conv2 = ConvNormActSame(out_chs, out_chs, 3, 1, apply_act=False)
        self.shortcut = ConvNormActSame(in_chs, out_chs, 1, stride, apply_act=False)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class HybridCNN(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (8, 16, 24)) -> None:
        super().__init__()
        self.stem = ConvNormActSame(3, widths[0], 3, 2)
        self.stage1 = ResBlockSame(widths[0], widths[1], 2)
        self.stage2 = ResBlockSame(widths[1], widths[2], 2)
        self.pool = nn.AvgPool2d(2, 2)
        self.head_conv = nn.Conv2d(widths[2], 32, 1)
        self.head_act = nn.SiLU(inplace=True)
        self.global_pool = SelectAdaptivePool2d(pool_type="fast", flatten=True)
        self.fc = Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1, 0, 1))
        x = self.pool(x)
        x = self.head_act(self.head_conv(x))
        x = self.global_pool(x)
        return self.fc(x)


def hybrid_like(num_classes: int = 10) -> nn.Module:
    """Input 40×40: the stride-2 'SAME' stem pads asymmetrically and the 5×5 map before pooling is padded."""
    return build(lambda: HybridCNN(num_classes), (3, 40, 40))
