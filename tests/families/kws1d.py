"""A 1-D keyword-spotting CNN (TC-ResNet-like) over MFCC frames: input (40 coefficients, 98 frames),
Conv1d / BatchNorm1d / ReLU / MaxPool1d, a residual block with a strided 1×1 projection,
AdaptiveAvgPool1d, Linear; 12 classes as Speech Commands' 10 words + silence + unknown."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import build


class ResBlock1d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, kernel_size: int = 9) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(out_ch)
        self.conv2 = nn.Conv1d(out_ch, out_ch, kernel_size, 1, kernel_size // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv1d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm1d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class KWS1d(nn.Module):
    def __init__(self, in_channels: int = 40, num_classes: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool1d(2),
        )
        self.block1 = ResBlock1d(16, 24, 2)
        self.block2 = ResBlock1d(24, 24, 1)
        self.pool = nn.MaxPool1d(3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.pool(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def kws1d_like(num_classes: int = 12) -> nn.Module:
    return build(lambda: KWS1d(40, num_classes), (40, 98))
