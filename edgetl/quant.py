"""Symmetric per-output-channel int8 storage of frozen weights."""
from __future__ import annotations

import torch

QMAX = 127


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (int8 weights, fp32 scale per output channel) with w ≈ q * scale."""
    flat = w.detach().reshape(w.shape[0], -1).float()
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / QMAX
    q = torch.round(flat / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float copy of an int8 weight; made where it is used and not kept."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return q.to(torch.float32) * scale.reshape(shape)
