"""A 1-channel, non-square-input CNN (a spectrogram patch of 24 mel bands × 40 frames, as in small
audio or sensor classifiers): rectangular kernels, pools and strides."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import build


class SpectrogramCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                    # 12 × 20
            nn.Conv2d(8, 16, (3, 5), stride=(1, 2), padding=(1, 2), bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),                              # 12 × 10
            nn.MaxPool2d((2, 1)),                               # 6 × 10
            nn.Conv2d(16, 24, 3, padding=1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(self.dropout(x))


def nonsquare_like(num_classes: int = 10) -> nn.Module:
    return build(lambda: SpectrogramCNN(num_classes), (1, 24, 40))
