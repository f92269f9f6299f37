"""Transformer layers written the way timm writes them (timm cannot be imported here): an MLP with
GELU, multi-head self-attention (fused SDPA or the explicit softmax(q k^T) form), LayerScale and a
pre-norm block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(0.0)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop1(self.act(self.fc1(x))))


class Attention(nn.Module):
    """timm's Attention: one qkv linear, heads split by reshape/permute; `fused` picks
    F.scaled_dot_product_attention or the explicit form. Works on (..., N, C) tokens."""

    def __init__(self, dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, n, c = x.shape
        qkv = self.qkv(x).reshape(*lead, n, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(len(lead) + 1, *range(len(lead)), len(lead) + 2, len(lead), len(lead) + 3)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = x.transpose(-3, -2).reshape(*lead, n, c)
        return self.proj(x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 0.1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, fused: bool = True,
                 init_values: float | None = None, approximate: str = "none") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, fused)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial norm scales and shifts (fresh ones are 1 and 0), so their gradients are tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
