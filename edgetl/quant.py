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


# A small integer (a 0/1 mask, a position in a pooling window) kept as int8 with scale 1 and zero point 0, in
# the ops ExecuTorch's XNNPACK delegate converts float <-> int8 with inside a delegate: the memory plan then
# holds 1 byte per element between the op that makes the value and the one that uses it.
SMALL_INT8 = (1.0, 0, -128, 127, torch.int8)


def decomposed_quant_ops():
    """torch.ops.quantized_decomposed, registered."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    return torch.ops.quantized_decomposed


def dequantize_weight_op(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`dequantize_per_channel` (output channels on axis 0, symmetric) as the quantized_decomposed op: the form
    ExecuTorch's XNNPACK delegate reads as an int8 weight with per-channel scales. Same values."""
    zero_points = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    return decomposed_quant_ops().dequantize_per_channel.default(q, scale, zero_points, 0, -127, 127, torch.int8)


def int8_weight_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x . (scale * q)^T with the weight dequantized by `dequantize_weight_op` right before the linear: ExecuTorch's
    XNNPACK delegate runs it as its f32_qc8w fully connected (fp32 activations, 1 byte per packed weight)."""
    return torch.nn.functional.linear(x, dequantize_weight_op(q, scale))


def int8_weight_linear_input_grad(g: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The input gradient g . (scale * q) of `int8_weight_linear` as (g * scale) . q: the transposed int8 weight has
    one scale per output channel of the forward, so it is scaled into the gradient (exact up to fp32 rounding) and
    the linear's int8 weight has unit scales, as XNNPACK's f32_qc8w takes them."""
    qt = q.t().contiguous()
    unit = torch.ones(qt.shape[0], dtype=scale.dtype, device=scale.device)
    # a constant of its own (the clone is folded at export): read both as the forward dequantize's scales and as
    # a multiply's operand, one shared constant gave wrong gradients from ExecuTorch 1.5.1's XNNPACK delegate
    scale = scale.clone()
    return torch.nn.functional.linear(g * scale, dequantize_weight_op(qt, unit))


def small_int_as_int8(t: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor of integers in [-128, 127] as int8, exactly (see SMALL_INT8)."""
    return decomposed_quant_ops().quantize_per_tensor.default(t, *SMALL_INT8)


def small_int_from_int8(q: torch.Tensor) -> torch.Tensor:
    """The fp32 value of `small_int_as_int8`'s int8 tensor."""
    return decomposed_quant_ops().dequantize_per_tensor.default(q, *SMALL_INT8)
