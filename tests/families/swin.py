"""A Swin-like window transformer with attention biases indexed by a constant table, the two ways
timm writes them: Swin's relative position bias `table[index.view(-1)].view(N, N, H).permute(2, 0, 1)`
and LeViT / EfficientFormer's `attention_biases[:, attention_bias_idxs]`, each added to q kᵀ before
the softmax. A 4×4 patch embedding, channels-last LayerNorm, windows of 4×4 tokens (kept as their own
dim: timm folds them into the batch, which a lean graph cannot), a patch-merging stage and mean pooling."""
from __future__ import annotations

import torch
from torch import nn

from ._common import build
from ._vit_layers import Mlp, randomize_norms


def _relative_index(ws: int) -> torch.Tensor:
    """Swin's relative_position_index: for each pair of tokens in a window, the row of their offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _levit_index(ws: int) -> torch.Tensor:
    """LeViT's attention_bias_idxs: for each pair, the index of their absolute offset (dy, dx)."""
    pts = [(i, j) for i in range(ws) for j in range(ws)]
    offsets: dict[tuple[int, int], int] = {}
    idxs = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in pts for b in pts]
    return torch.tensor(idxs).view(len(pts), len(pts))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, levit: bool) -> None:
        super().__init__()
        self.heads, self.scale, self.n, self.levit = heads, (dim // heads) ** -0.5, ws * ws, levit
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if levit:
            idx = _levit_index(ws)
            self.attention_biases = nn.Parameter(torch.randn(heads, int(idx.max()) + 1) * 0.1)
            self.register_buffer("attention_bias_idxs", idx, persistent=False)
        else:
            self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.1)
            self.register_buffer("relative_position_index", _relative_index(ws), persistent=False)

    def _bias(self) -> torch.Tensor:
        if self.levit:
            return self.attention_biases[:, self.attention_bias_idxs]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.n, self.n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, windows, N, C)
        b, w, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, w, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._bias()
        x = attn.softmax(-1) @ v
        return self.proj(x.transpose(2, 3).reshape(b, w, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, levit: bool) -> None:
        super().__init__()
        self.ws = ws
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, ws, levit)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.ws
        win = self.norm1(x).view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        win = self.attn(win.reshape(b, (h // ws) * (w // ws), ws * ws, c))
        win = win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + win
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbouring tokens concatenated, normed and projected (Swin's downsampling)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinLike(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 16, heads: int = 2, ws: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.norm0 = nn.LayerNorm(dim)
        self.block1 = SwinBlock(dim, heads, ws, levit=False)
        self.merge = PatchMerging(dim)
        self.block2 = SwinBlock(2 * dim, heads, ws, levit=True)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.patch_embed(x).permute(0, 2, 3, 1))  # (B, 8, 8, C) channels last
        x = self.block2(self.merge(self.block1(x)))
        return self.head(self.norm(x).mean((1, 2)))


def swin_like(num_classes: int = 10) -> nn.Module:
    """Input 32×32: 8×8 tokens of 16 in 4×4 windows with a relative position bias table, merged to
    4×4 tokens of 32 in one window with LeViT-style attention biases."""
    def make() -> nn.Module:
        model = SwinLike(num_classes)
        randomize_norms(model)
        return model

    return build(make, (3, 32, 32))
