"""Quantized storage of a tensor a rule keeps for its backward (the `q8` / `q4` modifiers).

Per channel (dim 1) an affine code: q = round((v - lo) / scale) with lo, hi the channel's min and
max over the batch and positions and scale = (hi - lo) / (2^bits - 1); v ≈ q * scale + lo. The zero
point lo uses all codes for one-sided values (e.g. sigmoid's derivative in [0, 0.25]).
8-bit codes are stored one per uint8 byte. 4-bit codes are packed two per byte (hi * 16 + lo),
built and split with float arithmetic (Mul/Add/Floor, then Cast): ONNX opset 17 has no BitwiseOr
(opset 18), and onnxruntime lacks uint8 kernels for some elementwise ops (Equal, measured)."""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def quantize(v: Tensor, bits: int) -> dict[str, Tensor]:
    dims = (0, *range(2, v.dim()))
    lo = v.amin(dims, keepdim=True)
    hi = v.amax(dims, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)  # a constant channel: every code is 0
    q = torch.round((v - lo) / scale)
    if bits == 4:
        flat = q.reshape(q.shape[0], -1)
        if flat.shape[1] % 2:
            flat = torch.nn.functional.pad(flat, (0, 1))
        pairs = flat.reshape(q.shape[0], -1, 2)
        q = pairs[:, :, 0] * 16.0 + pairs[:, :, 1]
    return {"q": q.to(torch.uint8), "s": scale, "z": lo}


def dequantize(kept: dict[str, Tensor], shape: tuple[int, ...], bits: int, dtype: torch.dtype) -> Tensor:
    """The kept value back as `dtype`, with per-sample `shape`."""
    q = kept["q"].to(dtype)
    if bits == 4:
        high = torch.floor(q / 16.0)
        low = q - high * 16.0
        q = torch.stack([high, low], -1).reshape(q.shape[0], -1)
        n = math.prod(shape)
        if q.shape[1] != n:
            q = q[:, :n]
        q = q.reshape(-1, *shape)
    return q * kept["s"] + kept["z"]

