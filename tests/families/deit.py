"""A DeiT-Tiny-like vision transformer, as timm's VisionTransformer writes it: a conv patch embedding
flattened to tokens, a class token and a learned position embedding used directly in forward,
pre-norm blocks (the first with fused SDPA, the second with the explicit softmax(q k^T) form, one
with LayerScale and tanh-GELU), a final LayerNorm and class-token pooling."""
from __future__ import annotations

import torch
from torch import nn

from ._common import build
from ._vit_layers import Block, randomize_norms


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class DeiTLike(nn.Module):
    def __init__(self, num_classes: int = 10, img: int = 32, patch: int = 8, dim: int = 32, heads: int = 2,
                 global_pool: str = "token") -> None:
        super().__init__()
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch, 3, dim)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(Block(dim, heads, fused=True),
                                    Block(dim, heads, fused=False, init_values=0.1, approximate="tanh"))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        x = self.norm(x)
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        return self.head(x)


def _make(num_classes: int, global_pool: str) -> nn.Module:
    model = DeiTLike(num_classes, global_pool=global_pool)
    randomize_norms(model)
    return model


def deit_like(num_classes: int = 10) -> nn.Module:
    """Input 32×32, 8×8 patches: 16 tokens + the class token, dim 32, 2 heads, 2 blocks."""
    return build(lambda: _make(num_classes, "token"), (3, 32, 32))


def deit_mean_like(num_classes: int = 10) -> nn.Module:
    """The same with mean pooling over the patch tokens (timm global_pool='avg')."""
    return build(lambda: _make(num_classes, "avg"), (3, 32, 32))


def deit_tiny_like(num_classes: int = 10, img: int = 224) -> nn.Module:
    """DeiT-Tiny's size, for the bench: 16×16 patches (196 tokens + the class token at 224×224),
    dim 192, 3 heads, 12 fused-SDPA blocks with MLP ratio 4 (5.5M parameters)."""

    def make() -> nn.Module:
        model = DeiTLike(num_classes, img=img, patch=16, dim=192, heads=3)
        model.blocks = nn.Sequential(*(Block(192, 3, mlp_ratio=4.0) for _ in range(12)))
        randomize_norms(model)
        return model

    return build(make, (3, img, img))
