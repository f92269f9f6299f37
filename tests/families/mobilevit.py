"""A MobileViT-like hybrid, as timm's MobileVitBlock writes it (the unfold/fold kept batch-first, as
ml-cvnets' MobileViTv2 does): a conv stem, MobileNetV2 inverted residuals (SiLU), and a MobileViT
block: local 3×3 conv and 1×1 projection, unfold into patches, transformer blocks over the patches'
tokens, fold back, 1×1 projection, concatenation with the input and a 3×3 fusion conv."""
from __future__ import annotations

import torch
from torch import nn

from ._common import build
from ._vit_layers import Block, randomize_norms


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        mid = cin * expand
        self.conv = nn.Sequential(conv_bn_act(cin, mid, 1), conv_bn_act(mid, mid, 3, stride, groups=mid),
                                  conv_bn_act(mid, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileVitBlock(nn.Module):
    def __init__(self, channels: int, dim: int, depth: int = 1, patch: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.conv_kxk = conv_bn_act(channels, channels, 3)
        self.conv_1x1 = nn.Conv2d(channels, dim, 1, bias=False)
        self.transformer = nn.Sequential(*[Block(dim, heads, fused=i % 2 == 0) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = conv_bn_act(dim, channels, 1)
        self.conv_fusion = conv_bn_act(2 * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        b, c, h, w = x.shape
        p = self.patch
        nh, nw = h // p, w // p
        # unfold: (B, C, H, W) -> (B, P, N, C), P = pixels per patch, N = patches
        x = x.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b, p * p, nh * nw, c)
        x = self.norm(self.transformer(x))
        # fold: (B, P, N, C) -> (B, C, H, W)
        x = x.reshape(b, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, h, w)
        x = self.conv_proj(x)
        return self.conv_fusion(torch.cat((shortcut, x), dim=1))


class MobileViTLike(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3, 2)
        self.stage0 = InvertedResidual(16, 16, 1)
        self.stage1 = InvertedResidual(16, 24, 2)
        self.stage2 = MobileVitBlock(24, 32, depth=2)
        self.final_conv = conv_bn_act(24, 48, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_conv(self.stage2(self.stage1(self.stage0(self.stem(x)))))
        return self.head(self.pool(x).flatten(1))


def mobilevit_like(num_classes: int = 10) -> nn.Module:
    """Input 32×32: 8×8 maps in the MobileViT block, 2×2 patches (4 pixels × 16 patches), dim 32."""
    def make() -> nn.Module:
        model = MobileViTLike(num_classes)
        randomize_norms(model)
        return model
    return build(make, (3, 32, 32))
