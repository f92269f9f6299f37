"""HRNet-like, written as the reference HRNet (HRNet/HRNet-Image-Classification and
HRNet-Semantic-Segmentation `seg_hrnet.py`, timm `hrnet_w18_small`) writes it: a stem of two 3×3/s2
convs, two parallel branches of BasicBlocks at 1/4 and 1/8 resolution, exchange units that fuse them
(low → high: 1×1 conv + BN + `nn.Upsample(scale_factor=2, mode='nearest')`; high → low: 3×3/s2 conv
+ BN; summed, then ReLU), and HRNetV2's representation head: the low branch brought to the high
one's size by `F.interpolate(size=..., mode='bilinear', align_corners=False)`, `torch.cat`, a 1×1
conv, global pooling and Linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import build


class BasicBlock(nn.Module):
    def __init__(self, chs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(chs, chs, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs)
        self.conv2 = nn.Conv2d(chs, chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class HighResolutionModule(nn.Module):
    """Two branches and their exchange (fuse_layers[i][j] brings branch j to branch i)."""

    def __init__(self, chs: tuple[int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([BasicBlock(c) for c in chs])
        self.fuse_layers = nn.ModuleList([
            nn.ModuleList([None, nn.Sequential(nn.Conv2d(chs[1], chs[0], 1, 1, 0, bias=False),
                                               nn.BatchNorm2d(chs[0]), nn.Upsample(scale_factor=2, mode="nearest"))]),
            nn.ModuleList([nn.Sequential(nn.Conv2d(chs[0], chs[1], 3, 2, 1, bias=False), nn.BatchNorm2d(chs[1])),
                           None]),
        ])
        self.relu = nn.ReLU(False)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        out = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, len(x)):
                y = y + (x[j] if i == j else self.fuse_layers[i][j](x[j]))
            out.append(self.relu(y))
        return out


class HRNet(nn.Module):
    def __init__(self, chs: tuple[int, int] = (8, 16), num_modules: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, chs[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs[0])
        self.conv2 = nn.Conv2d(chs[0], chs[0], 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs[0])
        self.relu = nn.ReLU(inplace=True)
        self.transition = nn.Sequential(nn.Conv2d(chs[0], chs[1], 3, 2, 1, bias=False), nn.BatchNorm2d(chs[1]),
                                        nn.ReLU(inplace=True))
        self.stage = nn.Sequential(*[HighResolutionModule(chs) for _ in range(num_modules)])
        self.last_layer = nn.Sequential(nn.Conv2d(sum(chs), 24, 1, bias=False), nn.BatchNorm2d(24),
                                        nn.ReLU(inplace=True))
        self.classifier = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        y = self.stage([x, self.transition(x)])
        h, w = y[0].size(2), y[0].size(3)
        y1 = F.interpolate(y[1], size=(h, w), mode="bilinear", align_corners=False)
        x = self.last_layer(torch.cat([y[0], y1], 1))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def hrnet_like(num_classes: int = 10) -> nn.Module:
    """Two resolutions (8 and 16 channels), two exchange modules, HRNetV2 head; 3×32×32."""
    return build(lambda: HRNet(num_classes=num_classes), (3, 32, 32))
