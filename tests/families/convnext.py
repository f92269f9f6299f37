"""A ConvNeXt-like CNN, as timm's ConvNeXt writes it: a 4×4 patchify stem with LayerNorm over
channels (a permute to channels-last and back), blocks of depthwise 7×7 conv, LayerNorm, an
inverted MLP with GELU and a layer-scale gamma used directly in forward, and a downsampling layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import build
from ._vit_layers import randomize_norms


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm.layers.LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, ls_init: float = 0.1) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        x = x.mul(self.gamma)
        return x.permute(0, 3, 1, 2) + shortcut


class ConvNeXtLike(nn.Module):
    def __init__(self, num_classes: int = 10, dims: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stage0 = ConvNeXtBlock(dims[0])
        self.downsample = nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage1 = ConvNeXtBlock(dims[1])
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.downsample(self.stage0(self.stem(x))))
        x = self.norm(x.mean((2, 3)))
        return self.head(x)


def convnext_like(num_classes: int = 10) -> nn.Module:
    """Input 32×32: 8×8 after the stem, 4×4 after downsampling, dims 16 and 32."""
    def make() -> nn.Module:
        model = ConvNeXtLike(num_classes)
        randomize_norms(model)
        return model
    return build(make, (3, 32, 32))
