"""Res2Net-like, written as timm `res2net50_26w_4s` / `res2net50d` (timm.models.res2net Bottle2neck):
the 1×1 conv's output `torch.split(out, self.width, 1)` into `scale` groups, each group's 3×3 conv fed
with `sp + spx[i]` (hierarchical residuals), the last group passed through (or `AvgPool2d(3, stride,
padding=1)` in a stage's first block), `torch.cat(spo, 1)`, 1×1 conv, `out += shortcut`; the
ResNet-D downsample `AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)` + 1×1 conv + BN; ResNet
deep stem (three 3×3 convs) and `MaxPool2d(3, 2, 1)`."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._common import build


class Bottle2neck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 26, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.is_first = stride > 1 or downsample is not None
        self.num_scales = max(1, scale - 1)
        width = int(math.floor(planes * (base_width / 64.0)))
        self.width = width
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        convs, bns = [], []
        for _ in range(self.num_scales):
            convs.append(nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False))
            bns.append(nn.BatchNorm2d(width))
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(bns)
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = nn.Conv2d(width * scale, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]  # redundant, for torchscript
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            if i == 0 or self.is_first:
                sp = spx[i]
            else:
                sp = sp + spx[i]
            sp = conv(sp)
            sp = bn(sp)
            sp = self.relu(sp)
            spo.append(sp)
        if self.scale > 1:
            if self.pool is not None:
                spo.append(self.pool(spx[-1]))
            else:
                spo.append(spx[-1])
        out = torch.cat(spo, 1)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        out = self.relu(out)
        return out


class Res2Net(nn.Module):
    def __init__(self, layers: list[int], planes: tuple[int, ...] = (4, 8, 12), stem: int = 8,
                 num_classes: int = 10, base_width: int = 32, scale: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem // 2, stem // 2, 3, padding=1, bias=False), nn.BatchNorm2d(stem // 2), nn.ReLU(inplace=True),
            nn.Conv2d(stem // 2, stem, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = stem
        stages = []
        for i, (p, n) in enumerate(zip(planes, layers)):
            stages.append(self._make_layer(p, n, 1 if i == 0 else 2, base_width, scale))
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int, base_width: int, scale: int) -> nn.Sequential:
        out = planes * Bottle2neck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1
                    else nn.Identity())
            downsample = nn.Sequential(pool, nn.Conv2d(self.inplanes, out, 1, bias=False), nn.BatchNorm2d(out))
        layers = [Bottle2neck(self.inplanes, planes, stride, downsample, base_width, scale)]
        self.inplanes = out
        layers += [Bottle2neck(out, planes, 1, None, base_width, scale) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.stages(x)
        x = self.global_pool(x).flatten(1)
        return self.fc(x)


def res2net_like(num_classes: int = 10) -> nn.Module:
    """res2net50d's blocks (scale 4, hierarchical split residuals, avg-pool downsample), three short stages."""
    return build(lambda: Res2Net([1, 2, 1], num_classes=num_classes), (3, 32, 32))
