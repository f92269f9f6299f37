"""What a target needs from the lean step, given to the step instead of patched into it.

One frozen `Lowering` per target (the exporter of each target owns its instance): the step
(`LeanStep`, `LeanEval`), its program and the rules read it; nothing is changed class-wide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .quant import dequantize_per_channel

Tensor = torch.Tensor


@dataclass(frozen=True)
class Lowering:
    # int8 + per-channel scale -> fp32, as the target's runtime spells it (ONNX: DequantizeLinear)
    dequantize: Callable[[Tensor, Tensor], Tensor] = dequantize_per_channel
    # a trainable bias of a frozen-weight linear as an add after the bias-free op (ExecuTorch's
    # XNNPACK would bake a bias fused into the op into its packed weights)
    bias_as_add: bool = False
    # exact zeros made from data (the op's input, kept masks) that pin what a graph runtime with
    # its own scheduler (onnxruntime) would otherwise run early: dequantizing a frozen weight, a
    # mask only the backward reads. Eager torch and ExecuTorch run the step as written.
    pin_schedule: bool = False


EAGER = Lowering()
# onnxruntime's schedule (the `onnx` target's step, less its dequantize op): what the analytic
# memory model follows unless it is given a target's lowering
PINNED = Lowering(pin_schedule=True)


def pins(w) -> bool:
    """Whether a rule, given its node's tensors `w`, adds the data dependencies that pin a graph
    runtime's schedule (see `Lowering.pin_schedule`)."""
    return getattr(w, "lowering", EAGER).pin_schedule


def separate_bias(w) -> bool:
    """Whether a rule emits the bias in `w` (a node's tensors) as an add after its bias-free op:
    the target asks for it and the bias trains while the weight is frozen."""
    lowering = getattr(w, "lowering", EAGER)
    return lowering.bias_as_add and w.trainable("bias") and not w.trainable("weight")
